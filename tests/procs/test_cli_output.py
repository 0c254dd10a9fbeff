"""The CLI's output for people: errors that name what is missing, rich's progress bar on a
terminal and one plain line elsewhere, and `dfs du` as a table and as JSON."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from pathlib import Path

from tests.cluster_procs import BIN, ProcCluster
from tests.conftest import random_file

# A transfer rate as rich shows it: the unit follows the speed (kB/s, MB/s, GB/s).
RATE = re.compile(r"\d+(\.\d+)? [kMG]?B/s")


def one_line_error(result: subprocess.CompletedProcess[str], command: str, text: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert result.stderr == f"dfs {command}: {text}\n", result.stderr


def test_errors_name_what_is_missing(cluster: ProcCluster, tmp_path: Path) -> None:
    local = random_file(tmp_path / "local", 1000)
    cluster.dfs("put", str(local), "/f")
    out = str(tmp_path / "x")
    one_line_error(
        cluster.dfs("get", "/nonexistent", out, check=False),
        "get",
        "No such file or directory: /nonexistent",
    )
    assert not os.path.exists(out)
    one_line_error(
        cluster.dfs("get", "/no/such/file", out, check=False),
        "get",
        "No such file or directory: /no",
    )
    one_line_error(
        cluster.dfs("put", str(local), "/nodir/f", check=False),
        "put",
        "No such file or directory: /nodir",
    )
    one_line_error(
        cluster.dfs("put", str(tmp_path / "absent"), "/f2", check=False),
        "put",
        f"No such file or directory: {tmp_path / 'absent'}",
    )
    one_line_error(
        cluster.dfs("get", "/f", str(tmp_path / "nodir" / "x"), check=False),
        "get",
        f"No such file or directory: {tmp_path / 'nodir'}",
    )
    for command in (["ls"], ["stat"], ["du"], ["rm"], ["fsck"]):
        one_line_error(
            cluster.dfs(*command, "/f/../gone/deeper", check=False),
            command[0],
            "No such file or directory: /f/../gone",
        )
    one_line_error(
        cluster.dfs("mv", "/missing", "/elsewhere", check=False),
        "mv",
        "No such file or directory: /missing",
    )
    one_line_error(
        cluster.dfs("mv", "/f", "/nodir/f", check=False), "mv", "No such file or directory: /nodir"
    )


def test_progress_is_one_plain_line_off_a_terminal_and_a_bar_on_one(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    local = random_file(tmp_path / "data", 20 << 20)
    put = cluster.dfs("put", str(local), "/data")
    lines = put.stderr.splitlines()
    assert len(lines) == 1, put.stderr
    assert lines[0].startswith("data ")
    assert RATE.search(lines[0]), lines[0]
    assert "21.0/21.0 MB" in lines[0]
    assert "\r" not in put.stderr
    assert "\x1b" not in put.stderr
    got = cluster.dfs("get", "/data", str(tmp_path / "back"))
    assert len(got.stderr.splitlines()) == 1
    assert RATE.search(got.stderr), got.stderr
    # On a terminal: rich's live bar, with the rate and the time left.
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [str(BIN / "dfs"), "get", "/data", str(tmp_path / "again")],
            stderr=follower,
            stdout=subprocess.DEVNULL,
            env=cluster.env | {"COLUMNS": "120", "TERM": "xterm"},
        )
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every writer of the terminal has closed it
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=120) == 0
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    text = seen.decode(errors="replace")
    assert "\x1b[" in text, text  # drawn in place
    for shown in ("ETA", "100%"):
        assert shown in text, text
    assert RATE.search(text), text


def test_du_table_and_json(cluster: ProcCluster, tmp_path: Path) -> None:
    local = random_file(tmp_path / "data", 3 << 20)
    cluster.dfs("mkdir", "/t/sub")
    cluster.dfs("put", str(local), "/t/a")
    cluster.dfs("put", str(local), "/t/sub/b")
    totals = json.loads(cluster.dfs("du", "--json", "/t").stdout)
    assert totals == {
        "path": "/t",
        "files": 2,
        "dirs": 2,
        "bytes": 2 * (3 << 20),
        "chunks": 2,
        "stored_bytes": 2 * (3 << 20),
    }
    header, row = cluster.dfs("du", "/t").stdout.splitlines()
    assert header.split() == ["FILES", "DIRS", "SIZE", "CHUNKS", "STORED", "PATH"]
    assert row.split() == ["2", "2", "6.0", "MiB", "2", "6.0", "MiB", "/t"]
    file_only = json.loads(cluster.dfs("du", "--json", "/t/a").stdout)
    assert (file_only["files"], file_only["dirs"], file_only["bytes"]) == (1, 0, 3 << 20)


def test_progress_names_are_printable_and_never_markup(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    """A local name that is not UTF-8, or that looks like rich markup, is shown as it is:
    escaped bytes, literal brackets; the line stays valid UTF-8."""
    odd = os.fsencode(tmp_path) + b"/caf\xe9[bold]x[red]"
    with open(odd, "wb") as f:
        f.write(os.urandom(5000))
    result = subprocess.run(
        [str(BIN / "dfs"), "put", odd, "/odd"], capture_output=True, env=cluster.env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    line = result.stderr.decode("utf-8")  # raises if it is not UTF-8
    assert line.startswith("caf\\xe9[bold]x[red] "), line
