"""The rules of extended attribute names and sizes, shared by the tracker and the mount.

As on ext4: the namespaces `user.`, `trusted.` and `security.` are kept; `system.*` (POSIX
ACLs: `system.posix_acl_access`, `system.posix_acl_default`) and any other prefix get
EOPNOTSUPP. A name is 1 to 255 bytes (ERANGE otherwise), a value at most 64 KiB (E2BIG). The
kernel enforces both limits itself before a request reaches FUSE; the tracker checks them again
for every other client. Who may read or write which namespace (trusted.* and security.* need
CAP_SYS_ADMIN, user.* needs read or write permission on a regular file or a directory) is the
kernel's check on the mount, as for every file system; the tracker keeps no credentials.
"""

from __future__ import annotations

from cluster.errors import InvalidArgument, NotSupported, OutOfRange

# setxattr(2) flags (os.XATTR_CREATE, os.XATTR_REPLACE).
XATTR_CREATE = 1
XATTR_REPLACE = 2
# Linux's limits (linux/limits.h).
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
# A listxattr answer cannot be longer (XATTR_LIST_MAX): names past it could never be listed.
XATTR_LIST_MAX = 65536
NAMESPACES = (b"user.", b"trusted.", b"security.")


def check_name(name: bytes) -> None:
    """Refuse what Linux refuses: ERANGE for an empty or overlong name, EOPNOTSUPP outside the
    namespaces kept, EINVAL for a bare prefix (`user.`) or a NUL."""
    if not name or len(name) > XATTR_NAME_MAX:
        raise OutOfRange(f"extended attribute name of {len(name)} bytes")
    if b"\0" in name:
        raise InvalidArgument("NUL in an extended attribute name")
    prefix = next((p for p in NAMESPACES if name.startswith(p)), None)
    if prefix is None:
        raise NotSupported(f"extended attribute {name!r}: only user., trusted. and security.")
    if name == prefix:
        raise InvalidArgument(f"extended attribute {name!r} without a name")
