#!/usr/bin/env bash
# Install pyfuse3 3.5.0 from its PyPI source with packaging/pyfuse3-3.5.0-dfs.patch applied:
#  - FUSE_FALLOCATE is routed to Operations.fallocate (pyfuse3 leaves it unset, so every
#    fallocate(2) on the mount got EOPNOTSUPP);
#  - terminate() after close() returns instead of handing libfuse a freed session;
#  - flock and fcntl locks reach the file system (Operations.enable_locks, getlk, setlk, flock,
#    release_lock_owner after flush), so that dfs holds them cluster-wide: pyfuse3 leaves
#    them to the kernel, per mount. Lock waits run outside the request workers and end
#    with EINTR when the kernel interrupts them or the session ends.
# The result is version 3.5.0+dfs3, which satisfies the project's `pyfuse3>=3.4`.
# Usage: packaging/build-pyfuse3.sh PYTHON   (the venv's python)
set -euo pipefail
python=$1
here=$(cd "$(dirname "$0")" && pwd)
version=3.5.0
local_version=$version+dfs3
if "$python" -c "import importlib.metadata as m, sys; sys.exit(m.version('pyfuse3') != '$local_version')" 2>/dev/null; then
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --no-binary :all: -d "$work" "pyfuse3==$version"
tar xzf "$work/pyfuse3-$version.tar.gz" -C "$work"
patch -s -d "$work/pyfuse3-$version" -p1 < "$here/pyfuse3-$version-dfs.patch"
SETUPTOOLS_SCM_PRETEND_VERSION=$local_version "$python" -m pip install -q "$work/pyfuse3-$version"
