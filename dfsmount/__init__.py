"""The dfs FUSE mount (`dfs-mount`): pyfuse3 + trio on top of `cluster.client.Client`.

Modules: `cli` (the command and its lifecycle), `fs` (the request handlers and their error
boundary), `inodes` (lookup counts, what the kernel was told), `handles` (open files and
directories), `cache` (file data: write buffers, uploads, commits, reads), `buffers` (one
chunk's write buffer, the dirty-memory bound), `chunkcache` (the read LRU) and `xattrs`
(what is known of extended attributes, so that the kernel's many asks stay local).

What the mount promises, and what FUSE does not let it promise:

- close() and fsync() return only once the data is stored on the keepers and committed on the
  tracker; a failed upload makes them (and later writes to that file) fail with EIO, or
  ENOSPC when no keeper has room.
- Close-to-open between mounts: an open() sees every file closed elsewhere before it. Between
  opens, names and attributes cached by the kernel may be up to one second old (entry and
  attribute timeouts), and a name created or removed on another mount can take that long to
  appear or vanish here.
- inotify/fanotify see only changes made through this mount, never those of other mounts.
- File locks (flock, fcntl, OFD) hold across mounts: the tracker holds them (cluster/locks.py).
  A mount silent for longer than the tracker's lock_lease_s loses them (it logs so).
- Extended attributes (user.*, trusted.*, security.*) are kept as on ext4, and like
  attributes may be up to one second old when set on another mount; POSIX ACLs are not
  (system.posix_acl_*: EOPNOTSUPP). atime is not updated by reads (as with noatime);
  st_blocks is the size rounded up, holes are not subtracted.
- Writes from two mounts to one file at once: the last commit wins per chunk.
"""
