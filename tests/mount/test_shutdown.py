"""Shutting a mount down never crashes, whatever the order of unmount and signals.

`umount` followed at once by `systemctl stop` (SIGTERM) used to kill dfs-mount with SIGSEGV
in most tries: the signal handler ended a FUSE session that the unmount had already freed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.cluster_procs import ProcCluster
from tests.mount.conftest import EXIT_TIMEOUT_S, MountFactory, is_mounted

ROUNDS = 8


def test_unmount_then_sigterm_never_crashes(cluster: ProcCluster, mount: MountFactory) -> None:
    m = mount(cluster)
    for round_ in range(ROUNDS):
        (m.path / f"f{round_}").write_bytes(b"x" * 1000)
        # A file still open at the unmount keeps the kernel's session alive a little longer.
        held = os.open(m.path / f"open{round_}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(held, b"y" * 5000)
            subprocess.run(["fusermount3", "-z", "-u", str(m.path)], check=True, timeout=30)
            assert m.proc is not None
            m.proc.send_signal(signal.SIGTERM)
            if round_ % 2:
                time.sleep(0.01 * round_)
                m.proc.send_signal(signal.SIGTERM)
        finally:
            try:
                os.close(held)
            except OSError:
                pass  # ENOTCONN once the process is gone: that is not what is tested here
        code = m.proc.wait(timeout=EXIT_TIMEOUT_S)
        assert code == 0, f"round {round_}: dfs-mount exited with {code}:\n{m.logs()}"
        assert not is_mounted(m.path)
        m.start()
    assert (m.path / "f0").read_bytes() == b"x" * 1000


def test_umount_then_systemctl_stop_never_crashes(
    cluster: ProcCluster, mount: MountFactory
) -> None:
    """The reported case: `fusermount3 -u` returns, then SIGTERM at once."""
    m = mount(cluster)
    for round_ in range(ROUNDS):
        (m.path / f"h{round_}").write_bytes(b"w" * 3000)
        subprocess.run(["fusermount3", "-u", str(m.path)], check=True, timeout=30)
        assert m.proc is not None
        m.proc.send_signal(signal.SIGTERM)
        code = m.proc.wait(timeout=EXIT_TIMEOUT_S)
        assert code == 0, f"round {round_}: dfs-mount exited with {code}:\n{m.logs()}"
        m.start()
    assert len(list(m.path.iterdir())) == ROUNDS


def test_sigterm_then_unmount_never_crashes(cluster: ProcCluster, mount: MountFactory) -> None:
    m = mount(cluster)
    for round_ in range(ROUNDS):
        (m.path / f"g{round_}").write_bytes(b"z" * 100)
        assert m.proc is not None
        m.proc.send_signal(signal.SIGTERM)
        time.sleep(0.005 * round_)
        subprocess.run(["fusermount3", "-z", "-u", str(m.path)], capture_output=True, timeout=30)
        code = m.proc.wait(timeout=EXIT_TIMEOUT_S)
        assert code == 0, f"round {round_}: dfs-mount exited with {code}:\n{m.logs()}"
        m.start()
    assert sorted(p.name for p in m.path.iterdir()) == sorted(f"g{i}" for i in range(ROUNDS))
