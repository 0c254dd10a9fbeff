"""The dfs error tree.

Every error that may cross the wire is a `DfsError` subclass with a stable wire `code` and the
`errno` that the FUSE boundary returns for it. A server raises one; the dispatcher sends it back
as an error reply for that request only; the client rebuilds the same class from the code.
`ProtocolError` is different: it means the peer broke the framing or the handshake, so the
connection is closed instead of answered.
"""

from __future__ import annotations

import errno as _errno
from typing import ClassVar


def printable(text: str) -> str:
    """`text` as valid UTF-8, for messages that quote names.

    Names are bytes and may not be UTF-8; decoded with `os.fsdecode` they carry lone surrogates,
    which msgpack (and any log shipper) refuses. Undecodable bytes are shown as `\\xff` escapes.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "backslashreplace")
        return raw.decode("utf-8", "backslashreplace")


def _only_escapes(text: str) -> bool:
    """Whether every surrogate in `text` is one that surrogateescape made (U+DC80..U+DCFF)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


class DfsError(Exception):
    """Base of every error that a request can answer with."""

    code: ClassVar[int] = 1
    errno: ClassVar[int] = _errno.EIO

    def __init__(self, message: str = "") -> None:
        super().__init__(printable(message or self.__class__.__doc__ or self.__class__.__name__))

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotFound(DfsError):
    """no such file or directory"""

    code = 2
    errno = _errno.ENOENT


class Exists(DfsError):
    """file exists"""

    code = 3
    errno = _errno.EEXIST


class NotEmpty(DfsError):
    """directory not empty"""

    code = 4
    errno = _errno.ENOTEMPTY


class IsADir(DfsError):
    """is a directory"""

    code = 5
    errno = _errno.EISDIR


class NotADir(DfsError):
    """not a directory"""

    code = 6
    errno = _errno.ENOTDIR


class NoSpace(DfsError):
    """no space left on the cluster"""

    code = 7
    errno = _errno.ENOSPC


class Unavailable(DfsError):
    """a server or every copy of a chunk is unreachable"""

    code = 8
    errno = _errno.EIO


class StoreUnavailable(Unavailable):
    """the tracker's metadata database is unreachable; try again"""

    # Worth retrying (as a tracker restart is): the database restarts or fails over while the
    # tracker stays up. A change whose COMMIT was cut off may have been applied, so a retried
    # create can find its own name (EEXIST), as after a lost reply on NFS.
    code = 21


class NotActive(Unavailable):
    """this tracker is a standby; the message names the active one ("not active, try
    HOST:PORT") when it knows it"""

    # Worth retrying elsewhere: clients go to the hinted tracker, or to the next one of their
    # `tracker` list when there is no hint, within retry_window_s.
    code = 22
    PREFIX = "not active, try "

    @property
    def hint(self) -> str:
        """The active tracker's HOST:PORT named in the message, or ""."""
        text = self.message
        return text[len(self.PREFIX) :].strip() if text.startswith(self.PREFIX) else ""

    @classmethod
    def pointing_to(cls, addr: str) -> NotActive:
        return cls(cls.PREFIX + addr if addr else "not active, no active tracker yet")


class ConnectionLost(Unavailable):
    """The peer could not be reached or the link broke: worth retrying elsewhere or later.
    Never sent on the wire (it travels as Unavailable)."""


class ChecksumMismatch(DfsError):
    """stored bytes do not match their checksum"""

    code = 9
    errno = _errno.EIO


class AuthFailed(DfsError):
    """authentication failed"""

    code = 10
    errno = _errno.EACCES


class InvalidArgument(DfsError):
    """invalid argument"""

    code = 11
    errno = _errno.EINVAL


class NameTooLong(DfsError):
    """file name too long"""

    code = 12
    errno = _errno.ENAMETOOLONG


class NotPermitted(DfsError):
    """operation not permitted"""

    code = 13
    errno = _errno.EPERM


class CrossDevice(DfsError):
    """invalid cross-device link"""

    code = 14
    errno = _errno.EXDEV


class StaleChunk(DfsError):
    """the chunk version asked for is not the one stored"""

    code = 15
    errno = _errno.EIO


class TooManyLinks(DfsError):
    """too many links"""

    code = 16
    errno = _errno.EMLINK


class NoData(DfsError):
    """no such extended attribute"""

    code = 17
    errno = _errno.ENODATA


class TooBig(DfsError):
    """extended attribute value too large"""

    code = 18
    errno = _errno.E2BIG


class OutOfRange(DfsError):
    """extended attribute name too long"""

    code = 19
    errno = _errno.ERANGE


class NotSupported(DfsError):
    """operation not supported"""

    code = 20
    errno = _errno.EOPNOTSUPP


class WouldBlock(DfsError):
    """the lock is held by another owner"""

    code = 23
    errno = _errno.EAGAIN


class Deadlock(DfsError):
    """waiting for this lock would deadlock"""

    code = 24
    errno = _errno.EDEADLK


class LockGrace(DfsError):
    """the tracker is waiting for mounts to reclaim their locks; ask again"""

    # Never reaches a program: the mount asks again until the grace period ends.
    code = 26
    errno = _errno.EAGAIN


class LocksLost(DfsError):
    """this mount's locks were released: its session lease expired on the tracker"""

    code = 25
    errno = _errno.ENOLCK


class LockFenced(DfsError):
    """this mount's locks on the file were released while it was silent (its lease expired):
    writes through the opens made before are refused; close the file and open it again"""

    # Another host may have taken the lock and changed the file since: data written by the
    # old holder, believing it still held the lock, would land on top (NFS answers EIO too).
    code = 27
    errno = _errno.EIO


class ProtocolError(Exception):
    """The peer broke the framing or the handshake: close the connection, answer nothing."""


def collapse(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error to raise for a nursery's exception group.

    Code that hides a nursery raises a plain error, as trio advises: when every failure in
    the group is a DfsError, the first one stands for all; anything else (a bug, a
    cancellation) keeps the whole group so nothing is lost.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    if leaves and all(isinstance(e, DfsError) for e in leaves):
        return leaves[0]
    return group


ERRORS_BY_CODE: dict[int, type[DfsError]] = {
    cls.code: cls
    for cls in (
        DfsError,
        NotFound,
        Exists,
        NotEmpty,
        IsADir,
        NotADir,
        NoSpace,
        Unavailable,
        ChecksumMismatch,
        AuthFailed,
        InvalidArgument,
        NameTooLong,
        NotPermitted,
        CrossDevice,
        StaleChunk,
        TooManyLinks,
        NoData,
        TooBig,
        OutOfRange,
        NotSupported,
        StoreUnavailable,
        NotActive,
        WouldBlock,
        Deadlock,
        LocksLost,
        LockGrace,
        LockFenced,
    )
}


def error_from_wire(code: int, message: str) -> DfsError:
    """Rebuild the error a server raised; an unknown code becomes a plain DfsError."""
    return ERRORS_BY_CODE.get(code, DfsError)(message)
