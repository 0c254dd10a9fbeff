"""A real PostgreSQL server for tests: initdb into a temporary directory, pg_ctl start on
127.0.0.1 and a free port (its Unix socket in the same directory), pg_ctl stop at the end.

PostgreSQL refuses to run as root, and tests run as root here: every PostgreSQL command then
runs as `nobody` (or DFS_TEST_PG_USER), whose directory it is. Each test gets a database of
its own (`new_database`), dropped with its connections afterwards. If the server's binaries
are missing the fixture fails, naming the package to install; it never skips.

`PgServer(host=, netns=, allow=)` runs it instead in a network namespace of tests/netlab.py,
listening on that host's address and trusting clients from `allow` (the lab's subnet): the
test's own namespace cannot reach that address, so the server is managed through its Unix
socket, which works across network namespaces.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.cluster_procs import free_port

PG_BIN = Path(os.environ.get("DFS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "dfs"
START_TIMEOUT_S = 60


class PgServer:
    def __init__(
        self, host: str = "127.0.0.1", netns: str | None = None, allow: str | None = None
    ) -> None:
        """`host`: the address to listen on; `netns`: the named network namespace (under
        /run/netns) to run the server in; `allow`: a CIDR whose clients are trusted besides
        127.0.0.1 (the servers of a lab, each in a namespace of its own)."""
        missing = [n for n in ("initdb", "pg_ctl", "postgres") if not (PG_BIN / n).is_file()]
        if missing:
            raise RuntimeError(
                f"PostgreSQL server binaries missing in {PG_BIN} ({', '.join(missing)}):"
                " install the Debian package `postgresql` (make deps does), or point"
                " DFS_TEST_PG_BIN at them"
            )
        self.dir = Path(tempfile.mkdtemp(prefix="dfs-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.host = host
        self.netns = netns
        self.allow = allow
        self.port = free_port()  # free in the test's namespace; in `netns` any port is
        self._uid: int | None = None
        self._gid: int | None = None
        if os.geteuid() == 0:
            user = pwd.getpwnam(os.environ.get("DFS_TEST_PG_USER", "nobody"))
            self._uid, self._gid = user.pw_uid, user.pw_gid
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self._databases = 0

    def _run(self, *argv: str, timeout: float = START_TIMEOUT_S) -> None:
        uid, gid = self._uid, self._gid
        if self.netns is not None:
            # Entering a namespace needs root: enter it first, then become the server's user.
            become = (
                ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
                if uid is not None
                else []
            )
            argv = ("nsenter", f"--net=/run/netns/{self.netns}", *become, *argv)
            uid = gid = None
        result = subprocess.run(
            argv,
            user=uid,
            group=gid,
            extra_groups=[] if uid is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.dir,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                f"\n{self.log_text()}"
            )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self) -> None:
        if not self.data.exists():
            self._run(
                str(PG_BIN / "initdb"),
                "-D", str(self.data),
                "-U", SUPERUSER,
                "--auth=trust",  # reachable only on 127.0.0.1 (or `allow`, all in a lab) and
                # a socket in a 0700 directory
                "-E", "UTF8",
                "--no-sync",  # initdb's own files; the server itself runs with fsync on
            )  # fmt: skip
            if self.allow is not None:
                with open(self.data / "pg_hba.conf", "a") as hba:
                    hba.write(f"host all all {self.allow} trust\n")
        self._pg_ctl("start")

    def _pg_ctl(self, action: str) -> None:
        options = f"-k {self.dir} -p {self.port} -c listen_addresses={self.host}"
        self._run(
            str(PG_BIN / "pg_ctl"),
            action,
            "-D", str(self.data),
            "-l", str(self.log),
            "-o", options,
            "-w", "-t", str(START_TIMEOUT_S),
            *(["-m", "fast"] if action in ("stop", "restart") else []),
        )  # fmt: skip

    def restart(self) -> None:
        """pg_ctl restart: every connection is cut, the server comes back on the same port."""
        self._pg_ctl("restart")

    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop the server (pg_ctl, then SIGKILL by PID if that fails) and remove its files."""
        try:
            pid = self.pid()
            if pid is not None:
                try:
                    self._pg_ctl("stop")
                except (RuntimeError, subprocess.TimeoutExpired):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline and _alive(pid):
                        time.sleep(0.05)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def uri(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def socket_uri(self, database: str) -> str:
        """The same server through its Unix socket."""
        return f"postgresql://{SUPERUSER}@/{database}?host={self.dir}&port={self.port}"

    def _admin_uri(self) -> str:
        """Where this process reaches the server: its address, or (in a namespace) its socket."""
        return self.uri() if self.netns is None else self.socket_uri("postgres")

    def new_database(self) -> str:
        self._databases += 1
        name = f"dfs_test_{self._databases}"
        with psycopg.connect(self._admin_uri(), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self._admin_uri(), autocommit=True) as db:
            db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
