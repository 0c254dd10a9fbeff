"""Processes for the benchmark: bounded commands, FUSE mounts, page cache and RSS.

Every command the benchmark times runs in a session of its own with a deadline; past it, the
whole process group is SIGKILLed and the phase fails (`PhaseTimeout`) instead of hanging the
run. FUSE filesystems (dfs-mount, memfs) run in their own sessions too, so that a Ctrl-C at the
terminal reaches only the harness, which then unmounts them in order (`fusermount3 -u`, then
`-z -u`) and stops them by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
MOUNT_TIMEOUT_S = 30.0
# dfs-mount flushes open files for up to 60 s when asked to stop.
EXIT_TIMEOUT_S = 75.0


class BenchError(Exception):
    """A phase failed: a command exited non-zero, or a result was wrong."""


class PhaseTimeout(BenchError):
    """A phase ran past its deadline."""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass  # stuck in a dead mount; the unmount in cleanup lets it go


def run_bounded(
    argv: list[str], timeout: float, *, env: dict[str, str] | None = None, what: str = ""
) -> tuple[float, bytes]:
    """Run `argv` to completion within `timeout` seconds; (elapsed seconds, stdout).

    stdout is captured (keep it small: time commands that write to /dev/null themselves);
    a non-zero exit raises BenchError with the end of stderr.
    """
    what = what or " ".join(argv)
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise PhaseTimeout(f"{what}: no result within {timeout:.0f} s") from None
    except BaseException:  # Ctrl-C: do not leave the command running
        _kill_group(proc)
        raise
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"{what}: exit status {proc.returncode}: {' | '.join(tail)}")
    return elapsed, out


def shell(script: str, timeout: float, what: str = "") -> float:
    """Seconds to run a bash pipeline (with pipefail) within `timeout`."""
    elapsed, _ = run_bounded(["bash", "-o", "pipefail", "-c", script], timeout, what=what or script)
    return elapsed


def drop_caches() -> bool:
    """Write back dirty pages, then drop the page cache, dentries and inodes (root only).
    False if not allowed: the figures then include a warm cache."""
    subprocess.run(["sync"], check=False, timeout=600)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def status_kib(pid: int, key: str) -> int:
    """A `kB` field of /proc/PID/status (VmHWM, VmRSS, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def write_bytes(pid: int) -> int:
    """Bytes process `pid` has caused to be written to storage (/proc/PID/io; root)."""
    with open(f"/proc/{pid}/io") as io:
        for line in io:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise BenchError(f"no write_bytes in /proc/{pid}/io")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set since it started or since `reset_peak_rss`."""
    return status_kib(pid, "VmHWM") / 1024


def reset_peak_rss(pid: int) -> bool:
    """Start a new peak (writing 5 to clear_refs resets VmHWM to the current RSS)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5\n")
    except OSError:
        return False
    return True


def is_mounted(path: Path) -> bool:
    """From /proc/self/mounts, so that a dead FUSE mount (ENOTCONN on stat) still counts."""
    target = os.path.abspath(path).replace(" ", "\\040")
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts if line.strip())


def mounts_under(root: Path) -> list[str]:
    prefix = os.path.abspath(root).replace(" ", "\\040") + "/"
    with open("/proc/self/mounts") as mounts:
        return [p for line in mounts if (p := line.split()[1]).startswith(prefix)]


def fusermount_u(path: Path) -> None:
    """Unmount, lazily if need be; quiet when nothing is mounted."""
    if not is_mounted(path):
        return
    try:
        result = subprocess.run(
            ["fusermount3", "-u", str(path)], capture_output=True, timeout=EXIT_TIMEOUT_S
        )
        ok = result.returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok and is_mounted(path):
        subprocess.run(["fusermount3", "-z", "-u", str(path)], capture_output=True, timeout=30)


def fstype(path: Path) -> str:
    """The type of the filesystem holding `path` (longest matching mount point)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            point = parts[1].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, parts[2]
    return kind


@dataclass
class FuseMount:
    """A FUSE filesystem process (`argv` mounts at `path` and stays in the foreground)."""

    name: str
    path: Path
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not (is_mounted(self.path) and os.path.ismount(self.path)):
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} before mounting:\n"
                    + self.log_tail()
                )
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} not mounted in {MOUNT_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Unmount and stop the process by PID, whatever state it is in."""
        try:
            fusermount_u(self.path)
        finally:
            proc = self.proc
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # in case it was stopped
                try:
                    proc.wait(timeout=EXIT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=10)

    def log_tail(self, lines: int = 20) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
