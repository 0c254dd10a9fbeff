"""`make run`: a local tracker, three keepers and a mount, in the foreground.

State lives under `--state` (./.dfs), so a second `make run` finds the same files. Ctrl-C (or
SIGTERM) unmounts and stops every process this started, by PID.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster import auth

BIN = Path(sys.executable).parent
TRACKER_PORT = 9420
KEEPER_PORTS = (9421, 9422, 9423)


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)


def _wait_line(log: Path, prefix: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(line.startswith(prefix) for line in log.read_text(errors="replace").splitlines()):
            return
        if proc.poll() is not None:
            sys.exit(f"{prefix.split(':')[0]} failed to start; see {log}")
        time.sleep(0.05)
    sys.exit(f"{prefix.split(':')[0]} did not start in time; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a local dfs cluster and mount it.")
    parser.add_argument("--state", default=".dfs")
    parser.add_argument("--mountpoint", default="mnt")
    parser.add_argument("--no-mount", action="store_true")
    args = parser.parse_args()
    state = Path(args.state).resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = state / "secret"
    if not secret.exists():
        auth.new_secret(secret)
    os.environ["DFS_SECRET_FILE"] = str(secret)  # every process started here inherits it
    tracker = f"127.0.0.1:{TRACKER_PORT}"
    procs: list[subprocess.Popen[bytes]] = []
    mountpoint = Path(args.mountpoint).resolve()
    try:
        log = state / "tracker.log"
        log.write_bytes(b"")
        procs.append(
            _start(
                [str(BIN / "dfs-tracker"), "--listen", tracker, "--data", str(state / "tracker")],
                log,
            )
        )
        _wait_line(log, "dfs-tracker: listening", procs[-1])
        for i, port in enumerate(KEEPER_PORTS):
            log = state / f"keeper{i}.log"
            log.write_bytes(b"")
            procs.append(
                _start(
                    [
                        str(BIN / "dfs-keeper"),
                        "--listen", f"127.0.0.1:{port}",
                        "--tracker", tracker,
                        "--data", str(state / f"keeper{i}"),
                    ],
                    log,
                )
            )  # fmt: skip
            _wait_line(log, "dfs-keeper: serving", procs[-1])
        print(f"tracker on {tracker}, keepers on ports {', '.join(map(str, KEEPER_PORTS))}")
        print(f"logs in {state}; try:")
        print(f"  DFS_SECRET_FILE={secret} {BIN / 'dfs'} --tracker {tracker} status")
        if args.no_mount:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return
        mountpoint.mkdir(exist_ok=True)
        print(f"mounting at {mountpoint} (Ctrl-C unmounts and stops everything)", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        mount = subprocess.Popen(
            [str(BIN / "dfs-mount"), str(mountpoint), "--tracker", tracker, "--foreground"]
        )
        procs.append(mount)
        mount.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
        print("stopped")


if __name__ == "__main__":
    main()
