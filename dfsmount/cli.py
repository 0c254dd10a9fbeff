"""dfs-mount: mount a dfs cluster with FUSE.

    dfs-mount MOUNTPOINT --tracker HOST:PORT [--foreground] [-o opt,opt] [--config FILE]
              [--log-level L] [--dirty-mb N] [--cache-mb N] [--transfers N] ...
    dfs-mount TRACKERS MOUNTPOINT -o opt,opt,...          (how mount(8) runs it from fstab)

The second form is what fuse3's `mount.fuse3` helper makes of an fstab line such as

    127.0.0.1:9420  /mnt/dfs  fuse.dfs-mount  _netdev,allow_other,secret_file=/etc/dfs/secret  0 0

Every `-o` option that names a dfs setting of the mount (`secret_file=...`, `cache_mb=64`,
`sync_on_close`, dashes or underscores) sets it as its flag would; options only mount(8)
reads (`_netdev`, `nofail`, `noauto`, `x-systemd.*`, ...) are dropped; the rest are FUSE
options, passed on.

Without `--foreground` the command starts itself again as a detached child with
`--foreground` and returns only once the mount is ready (exit 0), or prints the child's error
and exits non-zero: scripts can use the mount as soon as the command returns.

Lifecycle of the foreground process: check the mountpoint, /dev/fuse and fusermount3, check
that the tracker answers (a getattr of the root within TRACKER_CHECK_S), `pyfuse3.init`
(mounts), print the ready line, serve until the kernel ends the session (`fusermount3 -u`,
`umount`) or SIGINT/SIGTERM (flush every open file for at most SHUTDOWN_FLUSH_S, then
`pyfuse3.terminate()`), then unmount (`pyfuse3.close()`), flush what is left and release the
files this mount held open on the tracker.

User errors are one line on stderr, no traceback (`MountError`).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import pyfuse3
import trio

from cluster import config
from cluster.auth import Credentials, SecretError
from cluster.client import ROOT_INO, Client
from cluster.errors import AuthFailed, DfsError
from cluster.logs import setup_logging
from cluster.notify import notify
from dfsmount.fs import Operations
from dfsmount.readahead import set_readahead

log = logging.getLogger(__name__)

PROG = "dfs-mount"
READY_PREFIX = f"{PROG}: mounted "
# How long the tracker may take to answer the check before mounting.
TRACKER_CHECK_S = 5.0
# How long a detached start waits for its child to be mounted.
READY_TIMEOUT_S = 60.0
# Bound on flushing open files at SIGINT/SIGTERM and after unmount.
SHUTDOWN_FLUSH_S = 60.0
# Set in the environment of the detached child: it silences its stderr once ready, so that the
# parent (and whoever reads the parent's stderr through a pipe) sees end-of-file.
DETACHED_ENV = "DFS_MOUNT_DETACHED"
DEFAULT_OPTIONS = {"fsname": "dfs", "subtype": "dfs", "default_permissions": None}


class MountError(Exception):
    """A problem the user must fix; reported as one line without a traceback."""


# mount(8)'s own options, which reach us through mount.fuse3 and mean nothing to FUSE.
MOUNT8_ONLY = {"_netdev", "nofail", "auto", "noauto", "user", "users", "nouser", "owner"}
MOUNT8_ONLY |= {"group", "defaults", "comment"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Mount a dfs cluster with FUSE.")
    parser.add_argument(
        "where",
        nargs="+",
        metavar="[TRACKERS] MOUNTPOINT",
        help="an empty directory, after the trackers' HOST:PORT in the fstab form",
    )
    parser.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground (for systemd)"
    )
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT[,OPT...]",
        help="FUSE mount options, e.g. allow_other",
    )
    return parser


def split_options(given: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Split `-o` groups into FUSE options and dfs settings of the mount (key -> raw value;
    a bare key is a boolean set to true), dropping mount(8)'s own."""
    fuse: list[str] = []
    settings: dict[str, str] = {}
    for group in given:
        for option in group.split(","):
            option = option.strip()
            key, sep, value = option.partition("=")
            name = key.replace("-", "_")
            known = config.KEYS.get(name)
            if not option or key in MOUNT8_ONLY or key.startswith("x-"):
                continue
            if known is not None and "mount" in known.sections:
                settings[name] = value if sep else "true"
            else:
                fuse.append(option)
    return fuse, settings


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Both forms of the command line; settings resolved as everywhere (flag > DFS_<KEY> >
    config file > default), a dfs setting given with -o counting as its flag."""
    parser = build_parser()
    config.add_config_flags(parser, "mount")
    args = parser.parse_args(argv)
    if len(args.where) > 2:
        parser.error("expected MOUNTPOINT, or TRACKERS MOUNTPOINT")
    if len(args.where) == 2 and args.tracker is None:
        args.tracker = args.where[0]
    args.mountpoint = args.where[-1]
    args.options, from_options = split_options(args.options)
    for name, value in from_options.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    try:
        return args, config.load("mount", args)
    except config.ConfigError as exc:
        parser.exit(2, f"{PROG}: {exc}\n")


def mount_options(given: Sequence[str]) -> set[str]:
    """Our defaults (fsname=dfs, subtype=dfs, default_permissions) plus the user's -o options;
    a user's key=value replaces our default for that key."""
    options: dict[str, str | None] = dict(DEFAULT_OPTIONS)
    for group in given:
        for option in group.split(","):
            option = option.strip()
            if not option:
                continue
            key, sep, value = option.partition("=")
            options[key] = value if sep else None
    return {key if value is None else f"{key}={value}" for key, value in options.items()}


def check_mountpoint(path: str) -> str:
    mountpoint = os.path.abspath(path)
    try:
        if not os.path.isdir(mountpoint):
            if os.path.exists(mountpoint):
                raise MountError(f"mountpoint {mountpoint} is not a directory")
            raise MountError(f"mountpoint {mountpoint} does not exist")
        if os.path.ismount(mountpoint):
            raise MountError(f"{mountpoint} is already a mount point")
        if os.listdir(mountpoint):
            raise MountError(f"mountpoint {mountpoint} is not empty")
    except OSError as exc:
        raise MountError(
            f"mountpoint {mountpoint} is not usable ({exc.strerror}); if a dead mount is there, "
            f"run: fusermount3 -u {mountpoint}"
        ) from None
    return mountpoint


def check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing (load the fuse kernel module: modprobe fuse)")
    if shutil.which("fusermount3") is None:
        raise MountError("fusermount3 is not installed (install the fuse3 package)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, settings = parse_args(argv)
    setup_logging(settings["log_level"], PROG)
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` dumps every thread's stack
    try:
        options = mount_options(args.options)
        mountpoint = check_mountpoint(args.mountpoint)
        check_fuse()
        credentials = load_credentials(settings)
        if not args.foreground:
            return start_detached(argv, mountpoint)
        session = FuseSession()
        session.catch_late_signals()
        try:
            return trio.run(serve, mountpoint, settings, options, credentials, session)
        finally:
            # The interpreter's own teardown resets Python handlers to the default action.
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
    except MountError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return 1


def start_detached(argv: list[str], mountpoint: str) -> int:
    """Run ourselves with --foreground in a new session; return once it is mounted."""
    env = dict(os.environ, **{DETACHED_ENV: "1"})
    child = subprocess.Popen(
        [sys.executable, "-m", "dfsmount.cli", *argv, "--foreground"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    assert child.stderr is not None
    output: list[str] = []
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            child.kill()
            child.wait()
            raise MountError(
                f"the mount at {mountpoint} was not ready within {READY_TIMEOUT_S:g} s"
            )
        readable, _, _ = select.select([child.stderr], [], [], left)
        if not readable:
            continue
        data = os.read(child.stderr.fileno(), 65536)
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if line.startswith(READY_PREFIX):
                child.stderr.close()
                wait_until_mounted(mountpoint, child)
                print(line, file=sys.stderr, flush=True)
                return 0
            output.append(line)
    if pending:
        output.append(pending.decode(errors="replace"))
    code = child.wait()
    for line in output:
        print(line, file=sys.stderr)
    return code or 1


def wait_until_mounted(mountpoint: str, child: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not os.path.ismount(mountpoint):
        if child.poll() is not None:
            raise MountError(f"the mount process exited with status {child.returncode}")
        if time.monotonic() > deadline:
            raise MountError(f"{mountpoint} did not become a mount point")
        time.sleep(0.05)


def load_credentials(settings: dict[str, Any]) -> Credentials:
    try:
        return Credentials.from_settings(settings)
    except (SecretError, OSError) as exc:  # OSError: an unreadable TLS CA file
        raise MountError(str(exc)) from None


async def check_tracker(client: Client, tracker: str) -> None:
    try:
        with trio.fail_after(TRACKER_CHECK_S):
            await client.getattr(ROOT_INO)
    except trio.TooSlowError:
        raise MountError(
            f"cannot reach the tracker at {tracker} (no answer within {TRACKER_CHECK_S:g} s)"
        ) from None
    except AuthFailed as exc:
        raise MountError(f"the tracker at {tracker} refused this mount: {exc}") from None
    except DfsError as exc:
        raise MountError(f"cannot reach the tracker at {tracker}: {exc}") from None


async def serve(
    mountpoint: str,
    settings: dict[str, Any],
    options: set[str],
    credentials: Credentials,
    session: FuseSession,
) -> int:
    tracker = settings["tracker"]
    async with Client.connect(
        tracker,
        credentials,
        transfers=settings["transfers"],
        retry_window_s=settings["retry_window_s"],
        io_timeout_s=settings["io_timeout_s"],
    ) as client:
        try:
            await check_tracker(client, tracker)
        except MountError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
            return 1
        async with trio.open_nursery() as nursery:
            ops = Operations(
                client,
                nursery,
                dirty_bytes=settings["dirty_mb"] << 20,
                cache_bytes=settings["cache_mb"] << 20,
                sync_on_close=settings["sync_on_close"],
                local_locks=settings["local_locks"],
            )
            resolved = os.path.realpath(mountpoint)  # not after mounting: see set_readahead
            try:
                session.start(ops, mountpoint, options)
            except RuntimeError as exc:
                print(f"{PROG}: cannot mount at {mountpoint}: {exc}", file=sys.stderr, flush=True)
                nursery.cancel_scope.cancel()
                return 1
            if not hasattr(pyfuse3.Operations, "fallocate"):
                log.warning(
                    "this pyfuse3 does not pass fallocate on (packaging/build-pyfuse3.sh builds"
                    " one that does): fallocate on the mount gets EOPNOTSUPP"
                )
            if settings["readahead_kb"]:
                nursery.start_soon(tune_readahead, ops, resolved, settings["readahead_kb"])
            try:
                await nursery.start(watch_signals, ops, session)
                log.info(
                    "mounted %s at %s (options %s)", tracker, mountpoint, ",".join(sorted(options))
                )
                print(f"{READY_PREFIX}{tracker} at {mountpoint}", file=sys.stderr, flush=True)
                notify("READY=1")  # systemd (Type=notify): the mount point is live
                if os.environ.get(DETACHED_ENV):
                    _silence_stderr()
                await pyfuse3.main()
                session.ending = True
                log.info("the kernel ended the session; shutting down")
                notify("STOPPING=1")
            finally:
                session.ending = True
                session.close()
                with trio.move_on_after(SHUTDOWN_FLUSH_S, shield=True) as scope:
                    await ops.shutdown()
                if scope.cancelled_caught:
                    log.warning("shutdown flush gave up after %g s", SHUTDOWN_FLUSH_S)
                nursery.cancel_scope.cancel()
        # Shutting down, and the signal receivers are gone: a SIGTERM from now on must not
        # reach Python, whose wakeup fd (trio's) is closed as trio.run ends ("Exception
        # ignored ... Broken pipe" on stderr); ignored, it is as good as handled.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    return 0


async def tune_readahead(ops: Operations, mountpoint: str, kib: int) -> None:
    """Once the kernel has taken the answer to INIT (which resets the read-ahead to at most
    its own default), set ours."""
    await ops.session_started.wait()
    # The INIT answer is written when the handler that set the event returns.
    await trio.lowlevel.checkpoint()
    set_readahead(mountpoint, kib)


class FuseSession:
    """pyfuse3's one session, and whether it still exists.

    `pyfuse3.terminate()` after `pyfuse3.close()` hands libfuse a freed session and the process
    dies with SIGSEGV: that is what `umount` followed at once by SIGTERM (`systemctl stop`)
    did, the signal arriving while the shutdown flush ran. Every end of the session goes
    through here, in the one trio thread, so a check and the call it guards cannot interleave.
    """

    def __init__(self) -> None:
        self.open = False
        self.ending = False  # a signal came, or the kernel ended the session

    def catch_late_signals(self) -> None:
        """SIGINT/SIGTERM outside `watch_signals`' lifetime (it restores this handler when it
        ends): before the mount is up, stop as the default action would; once the shutdown
        has begun, ignore them, or one arriving at its last step would kill the process."""

        def late_signal(signum: int, frame: object) -> None:
            if not self.ending:
                raise SystemExit(128 + signum)

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, late_signal)

    def start(self, ops: Operations, mountpoint: str, options: set[str]) -> None:
        pyfuse3.init(ops, mountpoint, options)
        self.open = True

    def terminate(self) -> None:
        """End `pyfuse3.main()`, if the session still exists."""
        if self.open:
            pyfuse3.terminate()

    def close(self) -> None:
        """Unmount (if the kernel has not already) and free the session, once."""
        if self.open:
            self.open = False
            pyfuse3.close(unmount=True)


async def watch_signals(
    ops: Operations, session: FuseSession, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """SIGINT/SIGTERM: flush every open file (bounded), then end the FUSE session. Signals
    that come once the session is ending are taken and ignored: the shutdown is under way."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        stopping = False
        async for signum in signals:
            if stopping or not session.open:
                log.info("%s: already shutting down", signal.Signals(signum).name)
                continue
            stopping = session.ending = True
            log.info("%s: flushing open files and unmounting", signal.Signals(signum).name)
            notify("STOPPING=1")
            with trio.move_on_after(SHUTDOWN_FLUSH_S):
                await ops.data.flush_all()
            session.terminate()  # the kernel may have ended the session during the flush


def _silence_stderr() -> None:
    """Detached child: our parent has read the ready line and gone; keep logging harmless."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
