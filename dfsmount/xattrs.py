"""Extended attributes on the mount: what this mount knows of them, so most asks stay local.

The kernel asks for extended attributes far more often than anyone sets one: `ls -l` reads
`security.selinux` of every name, and every write(2), truncate and chown asks for
`security.capability` (to drop it, `file_remove_privs`). A tracker trip for each would make
`ls -l` one round trip per name and add one to every write. So, in `Operations`:

- `system.*` (POSIX ACLs) and unknown namespaces get EOPNOTSUPP without asking anyone.
- The attributes say how many extended attributes an inode has (`Attr.xattrs`): while this
  mount's attributes of the inode are fresh (`AttrCache`) and say none, a get is ENODATA and
  a list is empty without asking.
- Answers of the tracker (a value, ENODATA, a list of names) are kept here per inode for
  ATTR_TIMEOUT_S, the staleness the kernel allows for attributes: another mount's change shows
  within a second. This mount's own set and remove update what is kept; an answer that was in
  flight across one of them is not kept (`epoch`), as it may predate the change.

Touched only from the trio thread and without awaits: every method is atomic with respect to
other handlers. XATTR_CREATE and XATTR_REPLACE are checked by pyfuse3 with a getxattr before it
calls setxattr (it does not pass the flags on), so they hold against this mount's own changes
and against other mounts' changes older than ATTR_TIMEOUT_S.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from dfsmount.inodes import ATTR_TIMEOUT_S


@dataclass(slots=True)
class _Known:
    expires: float
    # name -> value, or None for a name known to be absent
    values: dict[bytes, bytes | None] = field(default_factory=dict)
    names: list[bytes] | None = None  # every name, once listed


class XattrCache:
    MAX_INODES = 100_000  # a bound, not a policy: entries are short-lived anyway

    def __init__(self) -> None:
        self._known: dict[int, _Known] = {}
        # Moves on every change this mount makes: an answer fetched across one is not kept.
        self.epoch = 0

    def _fresh(self, ino: int) -> _Known | None:
        known = self._known.get(ino)
        if known is not None and known.expires < trio.current_time():
            del self._known[ino]
            return None
        return known

    def _entry(self, ino: int) -> _Known:
        known = self._fresh(ino)
        if known is None:
            if len(self._known) >= self.MAX_INODES:
                self._known.clear()
            known = self._known[ino] = _Known(trio.current_time() + ATTR_TIMEOUT_S)
        return known

    def value(self, ino: int, name: bytes) -> tuple[bool, bytes | None]:
        """(True, value or None for absent) when known, (False, None) when the tracker must
        be asked."""
        known = self._fresh(ino)
        if known is None:
            return False, None
        if name in known.values:
            return True, known.values[name]
        if known.names is not None and name not in known.names:
            return True, None
        return False, None

    def names(self, ino: int) -> list[bytes] | None:
        known = self._fresh(ino)
        return None if known is None else known.names

    def put_value(self, ino: int, name: bytes, value: bytes | None, epoch: int) -> None:
        """Keep the tracker's answer, asked for at `epoch`, for `name` of `ino`."""
        if epoch == self.epoch:
            self._entry(ino).values[name] = value

    def put_names(self, ino: int, names: list[bytes], epoch: int) -> None:
        """Keep the tracker's list of the names of `ino` (from a listxattr, or none from
        attributes that count none), asked for at `epoch`; values known before are dropped."""
        if epoch == self.epoch:
            if len(self._known) >= self.MAX_INODES:
                self._known.clear()
            self._known[ino] = _Known(trio.current_time() + ATTR_TIMEOUT_S, names=list(names))

    def changed(self, ino: int, name: bytes, value: bytes | None) -> None:
        """This mount set (`value`) or removed (None) `name` of `ino`."""
        self.epoch += 1
        known = self._entry(ino)
        known.values[name] = value
        if known.names is not None:
            if value is None and name in known.names:
                known.names.remove(name)
            elif value is not None and name not in known.names:
                known.names.append(name)
