"""`dfs`: the command line for people and scripts.

Every subcommand is a thin layer over `cluster.client.Client`. Errors are one line on stderr
and a non-zero exit, never a traceback: 1 for a failed operation, 2 for bad usage; a path
that does not exist is named ("No such file or directory: /a/b", the first missing part).
Progress bars and tables are `rich`'s: on a terminal a live bar with rate and ETA, elsewhere
(a log, a pipe) one plain line once the transfer is done. `rich` is imported only by the
commands that draw with it (it costs tens of milliseconds at start). `ls` keeps the line
format of `ls -l`: a rich table of ten thousand entries takes seconds to lay out.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import stat as stat_mod
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from cluster import auth, config
from cluster import messages as m
from cluster.auth import Credentials
from cluster.client import Attr, Client
from cluster.errors import DfsError, IsADir, NotFound, printable
from cluster.logs import setup_logging

if TYPE_CHECKING:
    from rich.console import Console


def _mode_string(mode: int) -> str:
    return stat_mod.filemode(mode)


def _time(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ns / 1e9))


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _state(keeper: dict[str, Any]) -> str:
    if keeper["state"] != "draining":
        return str(keeper["state"])
    if keeper.get("removable"):
        return "drained: may be removed"
    return f"draining ({keeper.get('drain_left', '?')} chunks left)"


def _attr_json(attr: Attr) -> dict[str, Any]:
    return {
        "ino": attr.ino,
        "mode": oct(attr.mode),
        "type": "dir" if attr.is_dir else "file" if attr.is_file else "other",
        "nlink": attr.nlink,
        "uid": attr.uid,
        "gid": attr.gid,
        "size": attr.size,
        "mtime_ns": attr.mtime_ns,
    }


def _console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr) that prints names as they are (no markup, no
    highlighting, no emoji codes) and, off a terminal, never wraps a line."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError  # main() ends quietly with 141, as for any closed pipe

    stream = sys.stderr if stderr else sys.stdout
    return _Console(
        file=stream,
        markup=False,
        highlight=False,
        emoji=False,
        width=None if stream.isatty() else 1000,
    )


class Progress:
    """A transfer's progress on stderr, drawn by rich: on a terminal a live bar with bytes
    done, rate and time left; otherwise one line with the totals when it is done."""

    def __init__(self, label: str, total: int) -> None:
        from rich import filesize, markup
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            ProgressColumn,
            Task,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        class AverageSpeed(ProgressColumn):
            """Bytes over the whole transfer's time (rich's own speed is a recent window's)."""

            def render(self, task: Task) -> str:
                elapsed = task.elapsed or 0.0
                speed = task.completed / elapsed if elapsed > 0 else 0.0
                return f"{filesize.decimal(int(speed))}/s"

        console = _console(stderr=True)
        columns: list[Any] = [TextColumn("{task.description}")]
        if console.is_terminal:
            columns += [BarColumn(), TaskProgressColumn(), DownloadColumn(), TransferSpeedColumn()]
            columns += [TextColumn("ETA"), TimeRemainingColumn()]
        else:
            columns += [DownloadColumn(), AverageSpeed(), TextColumn("in")]
            columns += [TimeElapsedColumn()]
        self.bar = Bar(*columns, console=console, transient=False)
        # The name as valid text (not UTF-8: \x escapes) and never read as rich markup.
        self.task = self.bar.add_task(markup.escape(printable(label)), total=total)

    def __enter__(self) -> Progress:
        if self.bar.console.is_terminal:
            self.bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if self.bar.console.is_terminal:
            self.bar.stop()  # a failed transfer's bar stays where it stopped
        elif kind is None:  # off a terminal, only a transfer that ended gets its line
            self.bar.console.print(self.bar.get_renderable())

    def __call__(self, n: int) -> None:
        self.bar.advance(self.task, n)


async def _missing(client: Client, path: str) -> str | None:
    """The first part of `path` that does not exist (None: it all does)."""
    parts = [p for p in path.split("/") if p]
    for n in range(1, len(parts) + 1):
        prefix = "/" + "/".join(parts[:n])
        try:
            await client.resolve(prefix)
        except NotFound:
            return prefix
    return None


async def cmd_put(client: Client, args: argparse.Namespace) -> int:
    remote = args.remote
    try:
        target = await client.resolve(remote)
        if target.is_dir:
            remote = remote.rstrip("/") + "/" + os.path.basename(args.local)
    except NotFound:
        pass
    if os.path.isdir(args.local):
        raise IsADir(f"{args.local} is a directory")
    if not os.path.exists(args.local):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), args.local)
    with Progress(os.path.basename(args.local), os.path.getsize(args.local)) as progress:
        await client.upload(args.local, remote, progress)
    return 0


async def cmd_get(client: Client, args: argparse.Namespace) -> int:
    local = args.local
    if os.path.isdir(local):
        local = os.path.join(local, os.path.basename(args.remote.rstrip("/")))
    parent = os.path.dirname(local) or "."
    if local != "-" and not os.path.isdir(parent):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), parent)
    size = (await client.resolve(args.remote)).size
    with Progress(os.path.basename(args.remote), size) as progress:
        await client.download(args.remote, local, progress)
    return 0


async def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    attr = await client.resolve(args.path)
    entries = (
        [
            (e.name.decode(errors="surrogateescape"), e.attr)
            for e in await client.list_dir(args.path)
        ]
        if attr.is_dir
        else [(args.path, attr)]
    )
    if args.json:
        print(json.dumps([{"name": n, **_attr_json(a)} for n, a in entries]))
        return 0
    for name, a in sorted(entries):
        print(
            f"{_mode_string(a.mode)} {a.nlink:>3} {a.uid:>5} {a.gid:>5} {a.size:>12}"
            f" {_time(a.mtime_ns)} {name}"
        )
    return 0


async def cmd_mkdir(client: Client, args: argparse.Namespace) -> int:
    await client.make_dirs(args.path)
    return 0


async def cmd_mv(client: Client, args: argparse.Namespace) -> int:
    await client.move(args.src, args.dst)
    return 0


async def cmd_rm(client: Client, args: argparse.Namespace) -> int:
    attr = await client.resolve(args.path)
    if attr.is_dir and not args.recursive:
        raise IsADir(f"{args.path} is a directory (use rm -r)")
    await client.remove(args.path, recursive=args.recursive)
    return 0


async def cmd_stat(client: Client, args: argparse.Namespace) -> int:
    attr = await client.resolve(args.path)
    chunks = await client.get_chunks(attr.ino) if attr.is_file else None
    if args.json:
        out = _attr_json(attr)
        if chunks is not None:
            out["chunk_size"] = chunks.chunk_size
            out["chunks"] = [
                {
                    "index": c.index,
                    "id": c.chunk_id,
                    "version": c.version,
                    "length": c.length,
                    "keepers": list(c.keepers),
                }
                for c in sorted(chunks.chunks.values(), key=lambda c: c.index)
            ]
        print(json.dumps(out))
        return 0
    print(f"  path: {args.path}")
    print(
        f"  type: {'directory' if attr.is_dir else 'file' if attr.is_file else 'other'}"
        f"  inode: {attr.ino}  links: {attr.nlink}"
    )
    print(f"  mode: {_mode_string(attr.mode)}  uid: {attr.uid}  gid: {attr.gid}")
    print(f"  size: {attr.size} ({_size(attr.size)})  modified: {_time(attr.mtime_ns)}")
    if chunks is not None:
        print(f"  chunks: {len(chunks.chunks)} of {_size(chunks.chunk_size)}")
        for c in sorted(chunks.chunks.values(), key=lambda c: c.index):
            keepers = ", ".join(c.keepers) or "NO COPIES"
            print(
                f"    #{c.index:<5} id {c.chunk_id:016x} v{c.version:<4} {c.length:>10} B"
                f"  on {keepers}"
            )
    return 0


async def cmd_status(client: Client, args: argparse.Namespace) -> int:
    status = await client.cluster_status()
    trackers = await client.tracker_roles()
    if args.json:
        print(json.dumps({**status.document(), "trackers": trackers}))
        return 0
    for t in trackers:
        leader = t["leader"]
        epoch = f", epoch {leader['epoch']}" if leader and t["role"] == "active" else ""
        print(f"tracker {t['addr']}: {t['role']}{epoch}")
    print(
        f"replication {status.replication}, chunk size {_size(status.chunk_size_bytes)},"
        f" {status.files} inodes, {status.chunks} chunks"
    )
    health = status.health
    if health:
        print(
            f"health: {health['degraded']} chunks under-replicated, {health['lost']} without a"
            f" live copy, {health['copies_in_flight']} copies in flight"
            f" ({health['copies_done']} done, {_size(health['bytes_copied'])})"
        )
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ADDRESS", "STATE", "ZONE", "USED", "CAPACITY", "CHUNKS"):
        right = column in ("USED", "CAPACITY", "CHUNKS")
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    for k in status.keepers:
        table.add_row(
            Text(k["addr"]),
            Text(_state(k)),
            Text(k["zone"] or "-"),
            _size(k["used_bytes"]),
            _size(k["capacity_bytes"]),
            str(k["chunks"]),
        )
    _console().print(table)
    return 0


async def cmd_du(client: Client, args: argparse.Namespace) -> int:
    """Totals of a tree, answered by the tracker from the counters it keeps per directory."""
    # (Client has no method for it yet: cluster/client.py is being reworked elsewhere.)
    usage = await client._tracker(m.DiskUsage(path=os.fsencode(args.path)), m.DiskUsageReply)
    totals = {
        "path": args.path,
        "files": usage.files,
        "dirs": usage.dirs,
        "bytes": usage.size_bytes,
        "chunks": usage.chunks,
        "stored_bytes": usage.stored_bytes,
    }
    if args.json:
        print(json.dumps(totals))
        return 0
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("FILES", "DIRS", "SIZE", "CHUNKS", "STORED"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("PATH", no_wrap=True)
    table.add_row(
        f"{usage.files:,}",
        f"{usage.dirs:,}",
        _size(usage.size_bytes),
        f"{usage.chunks:,}",
        _size(usage.stored_bytes),
        Text(args.path),
    )
    _console().print(table)
    return 0


async def cmd_fsck(client: Client, args: argparse.Namespace) -> int:
    """Exit 0 when every chunk has its goal, 1 when some are degraded, 2 when data is lost."""
    report = await client.fsck(args.path)
    code = 2 if report.lost else 1 if report.degraded else 0
    if args.json:
        print(
            json.dumps(
                {
                    "files": report.files,
                    "chunks": report.chunks,
                    "degraded": report.degraded,
                    "lost": report.lost,
                    "problems": report.problems,
                    "healthy": code == 0,
                }
            )
        )
        return code
    for problem in report.problems:
        print(
            f"{problem['state'].upper():<9} {problem['path']} chunk #{problem['index']}"
            f" (id {problem['chunk_id']:016x}): {problem['copies']} of {problem['goal']} copies"
        )
    verdict = {0: "HEALTHY", 1: "DEGRADED", 2: "DATA LOST"}[code]
    print(
        f"{verdict}: {report.files} files, {report.chunks} chunks,"
        f" {report.degraded} under-replicated, {report.lost} without any live copy"
    )
    return code


async def cmd_setrep(client: Client, args: argparse.Namespace) -> int:
    await client.set_replication(args.path, args.copies)
    return 0


async def cmd_decommission(client: Client, args: argparse.Namespace) -> int:
    await client.decommission(args.keeper, cancel=args.cancel)
    if not args.cancel:
        print(f"{args.keeper}: draining; `dfs status` shows when it may be removed")
    return 0


COMMANDS = {
    "put": cmd_put,
    "get": cmd_get,
    "ls": cmd_ls,
    "mkdir": cmd_mkdir,
    "mv": cmd_mv,
    "rm": cmd_rm,
    "stat": cmd_stat,
    "status": cmd_status,
    "fsck": cmd_fsck,
    "setrep": cmd_setrep,
    "decommission": cmd_decommission,
    "du": cmd_du,
}
# Per command: remote paths that must exist, and remote paths whose parent must exist; when
# a command fails with ENOENT, the error names the first part of these that is missing.
REMOTE_PATHS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "put": ((), ("remote",)),
    "get": (("remote",), ()),
    "ls": (("path",), ()),
    "mv": (("src",), ("dst",)),
    "rm": (("path",), ()),
    "stat": (("path",), ()),
    "fsck": (("path",), ()),
    "setrep": (("path",), ()),
    "du": (("path",), ()),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfs", description="Use a dfs cluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("put", help="copy a local file into the cluster")
    p.add_argument("local")
    p.add_argument("remote")
    p = sub.add_parser("get", help="copy a cluster file to a local path")
    p.add_argument("remote")
    p.add_argument("local")
    p = sub.add_parser("ls", help="list a directory")
    p.add_argument("path", nargs="?", default="/")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("mkdir", help="make a directory and its parents")
    p.add_argument("path")
    p = sub.add_parser("mv", help="rename or move")
    p.add_argument("src")
    p.add_argument("dst")
    p = sub.add_parser("rm", help="remove a file, or a tree with -r")
    p.add_argument("-r", "--recursive", action="store_true")
    p.add_argument("path")
    p = sub.add_parser("stat", help="attributes and chunks of a path")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("status", help="the keepers and their state")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("secret", help="write a new cluster secret: dfs secret new PATH")
    p.add_argument("action", choices=["new"])
    p.add_argument("path")
    p = sub.add_parser("fsck", help="check that every chunk has its copies (exit 0, 1 or 2)")
    p.add_argument("path", nargs="?", default="/")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("setrep", help="set the copies per chunk of a file or a tree")
    p.add_argument("copies", type=int)
    p.add_argument("path")
    p = sub.add_parser(
        "du", help="files, directories, bytes and chunks of a tree (from the tracker's counters)"
    )
    p.add_argument("path", nargs="?", default="/")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("decommission", help="drain a keeper (address or id) before removal")
    p.add_argument("keeper")
    p.add_argument("--cancel", action="store_true", help="put the keeper back in service")
    return parser


async def _run(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    async with Client.connect(
        settings["tracker"],
        Credentials.from_settings(settings),
        transfers=settings["transfers"],
        retry_window_s=settings["retry_window_s"],
        io_timeout_s=settings["io_timeout_s"],
    ) as client:
        try:
            return await COMMANDS[args.command](client, args)
        except NotFound as exc:
            missing = await _first_missing(client, args)
            if missing is None:
                raise
            raise NotFound(f"No such file or directory: {missing}") from exc


async def _first_missing(client: Client, args: argparse.Namespace) -> str | None:
    existing, parents_of = REMOTE_PATHS.get(args.command, ((), ()))
    paths = [getattr(args, name) for name in existing]
    paths += [os.path.dirname(getattr(args, name).rstrip("/")) for name in parents_of]
    for path in paths:
        missing = await _missing(client, path)
        if missing is not None:
            return missing
    return None


def main(argv: Sequence[str] | None = None) -> None:
    # Names are bytes: print them as the bytes they are, as ls does, whatever their encoding.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="surrogateescape")
    parser = build_parser()
    args, settings = config.parse(parser, "cli", argv)
    setup_logging(settings["log_level"] if args.__dict__.get("log_level") else "ERROR", "dfs")
    if args.command == "secret":
        try:
            auth.new_secret(Path(args.path))
        except (auth.SecretError, OSError) as exc:
            print(f"dfs secret: {exc}", file=sys.stderr)
            sys.exit(1)
        print(f"wrote a new cluster secret to {args.path} (mode 0600)")
        sys.exit(0)
    try:
        code = trio.run(_run, args, settings)
        sys.stdout.flush()  # here, so that a closed pipe is caught below
    except auth.SecretError as exc:
        print(f"dfs {args.command}: {exc}", file=sys.stderr)
        code = 2
    except DfsError as exc:
        print(f"dfs {args.command}: {exc.message}", file=sys.stderr)
        code = 1
    except BrokenPipeError:
        # The reader went away (`dfs stat f | head -1`): stop quietly, as Unix tools do. The
        # interpreter flushes stdout once more at exit; point it at /dev/null so that flush
        # does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    except OSError as exc:
        print(
            f"dfs {args.command}: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
            file=sys.stderr,
        )
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
