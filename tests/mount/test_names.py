"""Names are bytes end to end, as on ext4: not UTF-8 names work through the mount, the wire,
the tracker's store and `dfs ls`, and a failing request costs its connection nothing."""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from tests.cluster_procs import BIN, ProcCluster
from tests.mount.conftest import MountFactory

NAMES = [b"bad\xff\xfename", b"caf\xe9", b"\x80\x81", "ünïcode".encode(), b"sp ace\ttab\nnl"]


def read(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_any_byte_name_works_through_the_mount(cluster: ProcCluster, mount: MountFactory) -> None:
    m = mount(cluster)
    root = os.fsencode(m.path)
    for i, name in enumerate(NAMES):
        with open(root + b"/" + name, "wb") as f:
            f.write(b"%d" % i)
        os.mkdir(root + b"/dir-" + name)
        os.symlink(name, root + b"/dir-" + name + b"/link")
    assert sorted(os.listdir(root)) == sorted([*NAMES, *(b"dir-" + n for n in NAMES)])
    for i, name in enumerate(NAMES):
        assert read(root + b"/" + name) == b"%d" % i
        assert os.readlink(root + b"/dir-" + name + b"/link") == name
        os.rename(root + b"/" + name, root + b"/dir-" + name + b"/moved-" + name)
    # Errors that quote such a name are answered, not a dropped connection: EEXIST, ENOENT,
    # ENOTEMPTY each come back and the next request on the same mount works.
    for name in NAMES:
        with pytest.raises(FileExistsError):
            os.mkdir(root + b"/dir-" + name)
        with pytest.raises(FileNotFoundError):
            os.stat(root + b"/" + name)
        with pytest.raises(OSError, match="not empty") as info:
            os.rmdir(root + b"/dir-" + name)
        assert info.value.errno == errno.ENOTEMPTY
        assert sorted(os.listdir(root + b"/dir-" + name)) == [b"link", b"moved-" + name]
    m.unmount()
    m.start()
    for i, name in enumerate(NAMES):
        assert read(root + b"/dir-" + name + b"/moved-" + name) == b"%d" % i
    assert "UnicodeEncodeError" not in cluster.logs()
    assert "closing connection" not in cluster.logs()


def test_dfs_ls_prints_the_bytes(cluster: ProcCluster, mount: MountFactory) -> None:
    m = mount(cluster)
    root = os.fsencode(m.path)
    for name in NAMES[:3]:
        open(root + b"/" + name, "wb").close()
    listing = subprocess.run(
        [str(BIN / "dfs"), "--tracker", cluster.tracker_addr, "ls", "/"],
        capture_output=True,
        env=cluster.env,
        check=True,
        timeout=60,
    ).stdout
    for name in NAMES[:3]:
        assert name in listing, listing
    as_json = json.loads(cluster.dfs("ls", "--json", "/").stdout)
    assert sorted(os.fsencode(e["name"]) for e in as_json) == sorted(NAMES[:3])
    missing = cluster.dfs("stat", "/bad\udcffmissing", check=False)
    assert missing.returncode == 1
    assert "bad\\xffmissing" in missing.stderr, missing.stderr
