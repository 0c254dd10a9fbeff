"""The kernel's read-ahead for the mount, set through sysfs.

The kernel reads ahead of a sequential reader by the backing device's `read_ahead_kb`, which
for a FUSE mount starts at 128 KiB: `cat` of a big file then asks for one 128 KiB piece after
another and waits for each. With 1 MiB it keeps several larger requests in flight, so the
mount answers fewer, bigger reads while its own read-ahead fetches whole chunks: cold `cat`
went from about 850 to 1,130 MB/s on the benchmark machine (same run, 1 GiB, 3 keepers).

The kernel lowers the value to its default while it processes the answer to FUSE's INIT, so
it is set after that (`cli.tune_readahead`). The device is found in /proc/self/mountinfo
rather than by stat()ing the mountpoint, which would be a FUSE request to this very process.
Writing the value needs root (or a writable sysfs); without it the kernel's default stays and
the mount says so in its log.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")
BDI = Path("/sys/class/bdi")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def device_of(mountpoint: str, mountinfo: str) -> str | None:
    """The "major:minor" of the newest mount at `mountpoint` in a mountinfo text."""
    found = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and _unescape(fields[4]) == mountpoint:
            found = fields[2]  # later lines are mounted over earlier ones
    return found


def set_readahead(mountpoint: str, kib: int) -> bool:
    """Set the read-ahead of the mount at `mountpoint` to `kib`; True if it was set.

    `mountpoint` must be resolved already (os.path.realpath before mounting): resolving it
    now would stat the mount, a request this process could never answer while it waits.
    """
    try:
        device = device_of(mountpoint, MOUNTINFO.read_text())
        if device is None:
            log.info("read-ahead left alone: %s not found in %s", mountpoint, MOUNTINFO)
            return False
        (BDI / device / "read_ahead_kb").write_text(f"{kib}\n")
    except OSError as exc:
        log.info("read-ahead left at the kernel's default: %s", exc)
        return False
    log.debug("read-ahead of %s (%s) set to %d KiB", mountpoint, device, kib)
    return True
