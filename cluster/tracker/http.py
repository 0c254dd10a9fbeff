"""The tracker's status page: keepers, chunk health, repair progress and the history of the
last hour and day as charts, refreshing itself.

`/` is rendered whole on the tracker, charts as inline SVG (`charts.py`), with no script and
no external asset (clusters often have no internet); a meta refresh reloads it every 5 s, the
history's step. `/?span=day` shows the day. `/api/status` is the document `dfs status --json`
prints; `/api/history` the series the charts draw (`history.py`; `?span=hour|day` for one).
Served by hypercorn on trio with a starlette app, never a hand-written HTTP parser.
"""

from __future__ import annotations

import logging
from html import escape
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from cluster.rpc import split_addr
from cluster.tracker import charts
from cluster.tracker.history import KINDS
from cluster.tracker.server import Tracker

log = logging.getLogger(__name__)

REFRESH_S = 5  # the history's step: a refresh sooner would show nothing new

STYLE = """
 body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
 h1 { font-size: 20px; margin-bottom: 4px; } h2 { font-size: 16px; margin: 1.5em 0 .5em; }
 table { border-collapse: collapse; min-width: 720px; }
 th, td { text-align: left; padding: 6px 12px; border-bottom: 1px solid #ddd; }
 .bar { width: 160px; height: 12px; background: #eee; border-radius: 3px; overflow: hidden; }
 .fill { height: 100%; background: #3a7bd5; }
 .alive { color: #17803d; } .dead { color: #c62828; font-weight: bold; }
 .draining, .leaving { color: #b26a00; }
 .summary span { margin-right: 2em; } .bad { color: #c62828; font-weight: bold; }
 .span a, .span b { margin-right: 1em; }
 .charts { display: grid; grid-template-columns: repeat(auto-fill, 530px); gap: 8px; }
 svg.chart { background: #fff; border: 1px solid #e4e4e4; border-radius: 4px; }
 svg .plot { fill: #fafafa; } svg line { stroke: #e2e2e2; }
 svg .title { font-size: 13px; font-weight: 600; fill: #222; }
 svg .unit { font-weight: normal; fill: #777; }
 svg .axis { font-size: 10px; fill: #777; } svg .legend { font-size: 11px; }
 svg path { fill: none; stroke-width: 1.6; stroke-linejoin: round; }
"""
SPANS = {"hour": "last hour, 5 s steps", "day": "last day, 1 min steps"}


def _keeper_state(keeper: dict[str, Any]) -> str:
    if keeper["state"] != "draining":
        return str(keeper["state"])
    if keeper.get("removable"):
        return "draining (may be removed)"
    return f"draining ({keeper.get('drain_left', '?')} left)"


def _summary(status: dict[str, Any]) -> str:
    health = status.get("health") or {}
    parts = [
        (f"{status['files']} inodes, {status['chunks']} chunks", ""),
        (f"replication {status['replication']}", ""),
        (f"{health.get('degraded', 0)} under-replicated", "bad" if health.get("degraded") else ""),
        (f"{health.get('lost', 0)} without a live copy", "bad" if health.get("lost") else ""),
        (
            f"repair: {health.get('copies_in_flight', 0)} in flight,"
            f" {health.get('copies_done', 0)} done ({charts.size(health.get('bytes_copied', 0))})",
            "",
        ),
    ]
    return "".join(f'<span class="{cls}">{escape(text)}</span>' for text, cls in parts)


def _keeper_rows(status: dict[str, Any]) -> str:
    rows = []
    for k in status["keepers"]:
        used, capacity = k["used_bytes"], k["capacity_bytes"]
        fill = 100 * used / capacity if capacity else 0
        cells = [
            escape(k["addr"]),
            f'<span class="{escape(k["state"])}">{escape(_keeper_state(k))}</span>',
            escape(k["zone"] or "-"),
            f'<div class="bar"><div class="fill" style="width:{fill:.1f}%"></div></div>',
            f"{charts.size(used)} / {charts.size(capacity)}",
            str(k["chunks"]),
            f"{k['last_seen_s']} s ago",
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "".join(rows)


def _tracker_rows(status: dict[str, Any]) -> str:
    """One line per tracker: address and role (active, standby, unreachable)."""
    parts = []
    for t in status.get("trackers", []):
        leader = t.get("leader") or {}
        epoch = f" (epoch {leader['epoch']})" if t["role"] == "active" and leader else ""
        cls = "bad" if t["role"] == "unreachable" else ""
        parts.append(
            f'<span class="{cls}">tracker {escape(str(t["addr"]))}: {escape(t["role"])}'
            f"{escape(epoch)}</span>"
        )
    return "".join(parts)


def _charts(ring: dict[str, Any], start: float, end: float) -> str:
    times = ring["t"]
    cluster = ring["cluster"]
    keepers = ring["keepers"]

    def series(names: list[tuple[str, str]]) -> list[tuple[str, list[float | None]]]:
        empty: list[float | None] = [None] * len(times)
        return [(label, cluster.get(name, empty)) for label, name in names]

    def per_keeper(name: str) -> list[tuple[str, list[float | None]]]:
        empty: list[float | None] = [None] * len(times)
        return [(addr, values.get(name, empty)) for addr, values in sorted(keepers.items())]

    def draw(title: str, lines: Any, unit: str = "", fmt: Any = charts.number) -> str:
        return charts.chart(title, times, lines, unit=unit, fmt=fmt, start=start, end=end)

    return "".join(
        [
            draw(
                "Cluster throughput",
                series([("read", "read_mb_s"), ("write", "write_mb_s")]),
                "MB/s",
            ),
            draw(
                "Metadata operations",
                series([(kind, f"{kind}_per_s") for kind in KINDS]),
                "per second",
            ),
            draw(
                "Chunk health",
                series(
                    [
                        ("under goal", "under_goal"),
                        ("no live copy", "lost"),
                        ("repair queue", "repair_queue"),
                    ]
                ),
                "chunks",
            ),
            draw("Repair", series([("copied", "repair_mb_s")]), "MB/s"),
            draw("Clients", series([("connections", "clients")]), "open to the tracker"),
            draw("Keeper reads", per_keeper("read_mb_s"), "MB/s"),
            draw("Keeper writes", per_keeper("write_mb_s"), "MB/s"),
            draw("Keeper free space", per_keeper("free_bytes"), "", charts.size),
            draw("Chunks held", per_keeper("chunks"), "per keeper"),
        ]
    )


def render_page(status: dict[str, Any], history: dict[str, Any], span: str) -> str:
    """The whole page, charts included, as one HTML document with nothing to fetch."""
    ring = history[span]
    now = history["now"]
    times = ring["t"]
    window = ring["step_s"] * ring["points"]
    # From the oldest point held (a young tracker's charts span its life) to now.
    start = max(times[0], now - window) if times else now - window
    links = "".join(
        f"<b>{escape(text)}</b>" if name == span else f'<a href="/?span={name}">{escape(text)}</a>'
        for name, text in SPANS.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dfs cluster</title>
<meta http-equiv="refresh" content="{REFRESH_S}">
<style>{STYLE}</style></head>
<body>
<h1>dfs cluster</h1>
<p class="summary" id="summary">{_summary(status)}</p>
<p class="summary" id="trackers">{_tracker_rows(status)}</p>
<table><thead><tr><th>keeper</th><th>state</th><th>zone</th><th>space</th><th>used</th>
<th>chunks</th><th>last heard</th></tr></thead><tbody id="keepers">{_keeper_rows(status)}</tbody>
</table>
<h2>History</h2>
<p class="span">{links}</p>
<div class="charts" id="charts">{_charts(ring, start, now)}</div>
<p><small>refreshes every {REFRESH_S} s &middot; JSON at <a href="/api/status">/api/status</a>
and <a href="/api/history">/api/history</a> &middot; history held in memory:
{charts.size(history["memory_bytes"])}</small></p>
</body></html>
"""


def _span(request: Request) -> str | None:
    span = request.query_params.get("span")
    if span is not None and span not in SPANS:
        raise HTTPException(400, f"span must be one of {', '.join(SPANS)}")
    return span


def make_app(tracker: Tracker) -> Starlette:
    async def document() -> dict[str, Any]:
        status = tracker.status().document()
        status["trackers"] = await tracker.tracker_roles()
        return status

    async def page(request: Request) -> HTMLResponse:
        span = _span(request) or "hour"
        status = await document()
        return HTMLResponse(render_page(status, tracker.history.document(span), span))

    async def api_status(request: Request) -> JSONResponse:
        return JSONResponse(await document())

    async def api_history(request: Request) -> JSONResponse:
        return JSONResponse(tracker.history.document(_span(request)))

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/status", api_status),
            Route("/api/history", api_history),
        ]
    )


async def serve_http(
    tracker: Tracker, addr: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    host, port = split_addr(addr)
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    log.info("status page on http://%s/", addr)
    await serve(make_app(tracker), config, task_status=task_status)  # type: ignore[arg-type]
