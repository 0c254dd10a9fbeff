"""Line charts as inline SVG, drawn on the tracker for the status page.

No JavaScript and nothing fetched: a page of these renders the same on a cluster with no
internet, in any browser, in a screenshot. A chart is a fixed-size plot of one or more
series over a time range; a null value breaks a line (no sample: a keeper was dead, the
tracker was not running). Each `<svg class="chart">` says in `data-points` how many values it
plots, each `<path class="series">` its own, so tests can tell a drawn chart from an empty one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from html import escape

WIDTH = 520
HEIGHT = 170
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 30, 22
COLORS = ("#3a7bd5", "#e8743b", "#19a979", "#945ecf", "#ed4a7b", "#13a4b4", "#6c8893", "#bf9a00")

Values = Sequence[float | None]


def size(n: float) -> str:
    """Bytes for people: 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.0f} B"


def number(n: float) -> str:
    if n == 0:
        return "0"
    if abs(n) >= 100:
        return f"{n:,.0f}"
    if abs(n) >= 10:
        return f"{n:.1f}"
    return f"{n:.2f}".rstrip("0").rstrip(".")


def _clock(t: float, seconds: bool) -> str:
    return time.strftime("%H:%M:%S" if seconds else "%H:%M", time.localtime(t))


def chart(
    title: str,
    times: Sequence[float],
    lines: Sequence[tuple[str, Values]],
    *,
    unit: str = "",
    fmt: Callable[[float], str] = number,
    start: float | None = None,
    end: float | None = None,
) -> str:
    """An SVG line chart of `lines` (label, values aligned with `times`) from `start` to
    `end` (default: the first and last time)."""
    t0 = start if start is not None else (times[0] if times else 0.0)
    t1 = end if end is not None else (times[-1] if times else 1.0)
    span = max(t1 - t0, 1e-9)
    finite = [v for _, values in lines for v in values if v is not None and math.isfinite(v)]
    top = max(finite, default=0.0)
    top = top * 1.1 if top > 0 else 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + (t - t0) / span * plot_w

    def y(v: float) -> float:
        return TOP + plot_h - v / top * plot_h

    parts = [
        f'<svg class="chart" data-points="{len(finite)}" xmlns="http://www.w3.org/2000/svg"'
        f' viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img"'
        f' aria-label="{escape(title)}">',
        f'<text x="{LEFT}" y="13" class="title">{escape(title)}'
        + (f' <tspan class="unit">({escape(unit)})</tspan>' if unit else "")
        + "</text>",
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="plot"/>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        value = top * fraction
        gy = y(value)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{gy:.1f}" y2="{gy:.1f}"/>')
        parts.append(
            f'<text x="{LEFT - 4}" y="{gy + 4:.1f}" class="axis" text-anchor="end">'
            f"{escape(fmt(value))}</text>"
        )
    seconds = span < 2 * 3600
    parts.append(
        f'<text x="{LEFT}" y="{HEIGHT - 6}" class="axis">{_clock(t0, seconds)}</text>'
        f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 6}" class="axis" text-anchor="end">'
        f"{_clock(t1, seconds)}</text>"
    )
    legend_x = LEFT
    for n, (label, values) in enumerate(lines):
        color = COLORS[n % len(COLORS)]
        segments: list[list[tuple[float, float]]] = [[]]
        for t, v in zip(times, values, strict=True):
            if v is None or not math.isfinite(v) or t < t0:
                if segments[-1]:
                    segments.append([])
                continue
            segments[-1].append((x(t), y(v)))
        drawn = [s for s in segments if s]
        points = sum(len(s) for s in drawn)
        path = " ".join(
            "M" + " L".join(f"{px:.1f},{py:.1f}" for px, py in segment) for segment in drawn
        )
        parts.append(
            f'<path class="series" data-series="{escape(label)}" data-points="{points}"'
            f' d="{path}" stroke="{color}"/>'
        )
        for segment in drawn:
            if len(segment) == 1:  # a lone point between gaps: a dot, or it would not show
                px, py = segment[0]
                parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2" fill="{color}"/>')
        latest = next((v for v in reversed(values) if v is not None), None)
        text = f"{label} {fmt(latest)}" if latest is not None else f"{label} -"
        parts.append(
            f'<text x="{legend_x}" y="26" class="legend" fill="{color}">{escape(text)}</text>'
        )
        legend_x += 9 + 6 * len(text)
    parts.append("</svg>")
    return "".join(parts)
