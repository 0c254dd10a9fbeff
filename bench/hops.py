"""`make bench` across hops: cp and cat of a file (256 MiB in the full run) through a dfs mount
whose client, tracker and three keepers each sit in a network namespace of their own
(tests/netcluster.py), joined by the userspace wire of tests/netlab.py.

Two settings of the same wire, in the same cluster, one after the other:
- bare: no delay, no loss. What the forwarder itself costs: every frame crosses one Python
  process, which shares this machine's cores with dfs (the kernel has no sch_netem, so delay
  and loss can only be had this way; see tests/wire.py).
- lossy: the issue's hops, 1 ms round trip and 0.5% of frames lost.
Each figure is reported beside the loopback dfs figure of the same run (bench.run's cp and
cat of its big file), since absolute figures drift between runs. The read is cold as in the
loopback phase: a fresh mount after a page-cache drop. The bytes are compared with `cmp`.

Everything it starts is registered with the bench's cleanups: the mounts are unmounted and
the daemons, the forwarder and the namespaces stopped and removed whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
from typing import TYPE_CHECKING

from bench.procs import MiB, run_bounded, shell
from tests.cluster_procs import BIN
from tests.netcluster import net_cluster
from tests.netlab import LOSSY, tcp_rtt_s

if TYPE_CHECKING:
    from bench.run import Bench

MB = 1_000_000


def run_hops(bench: Bench, heartbeat_s: float, dead_after_s: float) -> dict[str, float]:
    """The figures: `hops_{bare,lossy}_{cp,cat}_mbs`, `hops_rtt_ms` (client to tracker,
    lossy), `hops_loss` (the fraction of frames the wire dropped during the lossy phases)."""
    size = bench.sizes.hops_bytes
    root = bench.scratch / "hops"
    root.mkdir()
    source = root / "src"
    with open(source, "wb") as out:
        for left in range(size, 0, -16 * MiB):
            out.write(os.urandom(min(left, 16 * MiB)))

    bench.phase = "starting a cluster across hops"
    bench.say(bench.phase)
    stack = contextlib.ExitStack()
    bench.on_cleanup("stop the cluster across hops", stack.close)
    # As in bench.run: the daemons must not see a Ctrl-C before the mount has unmounted.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        cluster = stack.enter_context(
            net_cluster(
                root / "cluster", wire=LOSSY, heartbeat_s=heartbeat_s, dead_after_s=dead_after_s
            )
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    lab = cluster.lab
    assert cluster.tracker_node is not None
    r = {"hops_rtt_ms": tcp_rtt_s(cluster.client, cluster.tracker_node.addr) * 1000}

    src = shlex.quote(str(source))
    for setting, delay_s, loss in [("bare", 0.0, 0.0), ("lossy", LOSSY.delay_s, LOSSY.loss)]:
        lab.set_wire(delay_s, loss)
        before = lab.wire_stats()
        path = root / f"mnt-{setting}"
        argv = [str(BIN / "dfs-mount"), str(path), "--tracker", cluster.tracker_addr]
        m = bench.mount(
            f"dfs-mount-hops-{setting}",
            path,
            cluster.client.net_argv([*argv, "--foreground"]),
            cluster.env,
        )
        big = shlex.quote(str(path / "big"))
        bench.phase = f"across hops ({setting} wire): cp of {size // MiB} MiB"
        bench.say(bench.phase)
        bench.warm(source)
        seconds = shell(f"cp {src} {big} && sync", bench.deadline(size), bench.phase)
        r[f"hops_{setting}_cp_mbs"] = size / MB / seconds
        bench.stop_mount(m)
        bench.cold()
        bench.phase = f"across hops ({setting} wire): cat of {size // MiB} MiB"
        m.start()  # fresh: nothing of the file in dfs-mount's cache
        seconds = shell(f"cat {big} > /dev/null", bench.deadline(size), bench.phase)
        r[f"hops_{setting}_cat_mbs"] = size / MB / seconds
        bench.phase = f"across hops ({setting} wire): checking the copy"
        run_bounded(["cmp", str(source), str(path / "big")], bench.deadline(size), what="cmp")
        run_bounded(["rm", "-f", str(path / "big")], bench.deadline(), what="rm across hops")
        bench.stop_mount(m)
        after = lab.wire_stats()
        if loss:
            frames = after["frames"] - before["frames"]
            r["hops_loss"] = (after["dropped_loss"] - before["dropped_loss"]) / max(1, frames)
    source.unlink()
    return r
