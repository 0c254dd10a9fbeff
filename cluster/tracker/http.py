"""The tracker's status page: keepers, chunk health and repair progress, refreshing itself.

`/` is a small self-contained page (no external assets: clusters often have no internet) that
polls `/api/status` every two seconds; `/api/status` is the same document `dfs status --json`
prints. Served by hypercorn on trio with a starlette app, never a hand-written HTTP parser.
"""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from cluster.rpc import split_addr
from cluster.tracker.server import Tracker

log = logging.getLogger(__name__)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dfs cluster</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
 h1 { font-size: 20px; } table { border-collapse: collapse; min-width: 720px; }
 th, td { text-align: left; padding: 6px 12px; border-bottom: 1px solid #ddd; }
 .bar { width: 160px; height: 12px; background: #eee; border-radius: 3px; overflow: hidden; }
 .fill { height: 100%; background: #3a7bd5; }
 .alive { color: #17803d; } .dead { color: #c62828; font-weight: bold; }
 .draining, .leaving { color: #b26a00; }
 .summary span { margin-right: 2em; } .bad { color: #c62828; font-weight: bold; }
</style></head>
<body>
<h1>dfs cluster</h1>
<p class="summary" id="summary">loading...</p>
<table><thead><tr><th>keeper</th><th>state</th><th>zone</th><th>space</th><th>used</th>
<th>chunks</th><th>last heard</th></tr></thead><tbody id="keepers"></tbody></table>
<p><small>refreshes every 2 s &middot; JSON at <a href="/api/status">/api/status</a></small></p>
<script>
function size(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}
function cell(row, text, cls) {
  const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; row.appendChild(td); return td;
}
async function refresh() {
  try {
    const status = await (await fetch("/api/status")).json();
    const h = status.health || {};
    const summary = document.getElementById("summary");
    summary.innerHTML = "";
    const parts = [
      [status.files + " inodes, " + status.chunks + " chunks", ""],
      ["replication " + status.replication, ""],
      [(h.degraded || 0) + " under-replicated", h.degraded ? "bad" : ""],
      [(h.lost || 0) + " without a live copy", h.lost ? "bad" : ""],
      ["repair: " + (h.copies_in_flight || 0) + " in flight, " + (h.copies_done || 0)
        + " done (" + size(h.bytes_copied || 0) + ")", ""],
    ];
    for (const [text, cls] of parts) {
      const span = document.createElement("span"); span.textContent = text;
      span.className = cls; summary.appendChild(span);
    }
    const body = document.getElementById("keepers");
    body.innerHTML = "";
    for (const k of status.keepers) {
      const row = document.createElement("tr");
      cell(row, k.addr);
      let state = k.state;
      if (k.state === "draining") {
        state += k.removable ? " (may be removed)" : " (" + k.drain_left + " left)";
      }
      cell(row, state, k.state);
      cell(row, k.zone || "-");
      const bar = cell(row, "");
      const outer = document.createElement("div"); outer.className = "bar";
      const fill = document.createElement("div"); fill.className = "fill";
      fill.style.width = (k.capacity_bytes ? 100 * k.used_bytes / k.capacity_bytes : 0) + "%";
      outer.appendChild(fill); bar.appendChild(outer);
      cell(row, size(k.used_bytes) + " / " + size(k.capacity_bytes));
      cell(row, k.chunks);
      cell(row, k.last_seen_s + " s ago");
      body.appendChild(row);
    }
  } catch (e) {
    document.getElementById("summary").textContent = "tracker unreachable: " + e;
  }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""


def make_app(tracker: Tracker) -> Starlette:
    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    async def api_status(request: Request) -> JSONResponse:
        return JSONResponse(tracker.status().document())

    return Starlette(routes=[Route("/", page), Route("/api/status", api_status)])


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
