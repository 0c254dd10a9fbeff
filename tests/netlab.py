"""A multi-host test bed on one machine: each server and the client side in a network
namespace of its own, joined to a namespace of the test's own by one of two wires:

- `NetLab()`: veth pairs to a Linux bridge. As fast as the kernel; no delay, no loss.
- `NetLab(wire=Wire(delay_s=0.0005, loss=0.005))`: TAP devices switched by a userspace
  forwarder (tests/wire.py) that delays every frame and drops a random fraction of them.

    lab = NetLab()            # made by the test, removed by `close()` even when it fails
    t = lab.node("t")         # a namespace with one address, 10.77.<lab>.<n>/24
    lab.partition(t)          # its link goes nowhere: cut off, not killed
    lab.heal(t)

Addresses exist only inside the namespaces, so no traffic can leave them. Servers run under
`ip netns exec` (which gives them a mount namespace of their own too, harmless for a daemon);
a FUSE mount runs under `nsenter --net` only, so that its mount is seen by the test.

Why a userspace wire: delay and loss are the kernel's sch_netem (`tc qdisc ... netem`), which
this machine's kernel lacks (and it loads no modules), while /dev/net/tun works. So the lab
applies them in a forwarder process of its own, in the lab's namespace, started and killed
by PID. What that means: every frame crosses user space in one Python process, so the wire
has a throughput ceiling of its own (measured by `make bench`, beside the loopback figure),
and the delay is as exact as that process's scheduling (a busy machine adds to it, never
takes from it). The forwarder uses a large MTU (`Wire.mtu`, 9000) on every node to keep its
frame rate down. Partitions work on both wires: the bridge end goes down, or the forwarder
drops every frame from and to the node.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

NETNS_DIR = Path("/run/netns")
WIRE_PROGRAM = Path(__file__).with_name("wire.py")
# Every command to the forwarder is answered at once; this only catches a dead one.
WIRE_ANSWER_TIMEOUT_S = 10.0
CLONE_NEWNET = 0x40000000
_labs = itertools.count(1)
T = TypeVar("T")


def ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


@dataclass(frozen=True)
class Wire:
    """What the userspace wire does to every frame: `delay_s` one way (an RTT of twice
    that), `loss` the fraction dropped; `mtu` of every node's link (the forwarder's cost is
    per frame, so larger frames carry more bytes for it)."""

    delay_s: float = 0.0
    loss: float = 0.0
    mtu: int = 9000
    seed: int | None = None


# The lossy hops: a 1 ms round trip (0.5 ms each way) and 0.5% of frames lost.
LOSSY = Wire(delay_s=0.0005, loss=0.005)


@dataclass
class Node:
    name: str
    ns: str
    addr: str  # without the prefix length
    bridge_end: str  # the veth end on the bridge (its namespace), or the tap's forwarder name

    def exec_argv(self, argv: list[str]) -> list[str]:
        """Run `argv` in this node's network (and a private mount) namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def net_argv(self, argv: list[str]) -> list[str]:
        """Run `argv` in this node's network namespace only (a FUSE mount the test sees)."""
        return ["nsenter", f"--net={NETNS_DIR / self.ns}", *argv]

    def call(self, fn: Callable[[], T], timeout: float = 300) -> T:
        """`fn()` in a thread of this process that has entered this node's network namespace,
        so that its sockets are the node's: the test talks to servers as the node would,
        without a process (and its start-up time) in between. setns() moves only the calling
        thread; the thread ends with the call."""
        result: list[T] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(NETNS_DIR / self.ns, os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {self.ns}")
                finally:
                    os.close(fd)
                result.append(fn())
            except BaseException as exc:  # handed to the caller's thread, re-raised there
                error.append(exc)

        thread = threading.Thread(target=run, name=f"in-{self.ns}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"a call in {self.ns} took over {timeout} s")
        if error:
            raise error[0]
        return result[0]


def tcp_rtt_s(src: Node, addr: str, samples: int = 10) -> float:
    """The shortest of `samples` round trips from `src` to `addr`, each a TCP connect to a
    port nobody listens on (SYN out, RST back: one round trip, with no server needed; a
    lost SYN or RST makes one sample long, hence the shortest)."""

    def measure() -> float:
        best = float("inf")
        for _ in range(samples):
            with socket.socket() as sock:
                sock.settimeout(5)
                started = time.monotonic()
                try:
                    sock.connect((addr, 9))  # discard: no dfs server listens there
                except ConnectionRefusedError:
                    best = min(best, time.monotonic() - started)
                except TimeoutError:
                    continue
        return best

    return src.call(measure)


@dataclass
class NetLab:
    wire: Wire | None = None  # None: veth pairs and a bridge
    number: int = field(default_factory=lambda: (os.getpid() % 200 + next(_labs)) % 250 + 1)
    nodes: list[Node] = field(default_factory=list)
    made: list[str] = field(default_factory=list)  # namespaces, in the order made
    forwarder: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.prefix = f"dfs{os.getpid() % 10000}x{self.number}"
        self.bridge_ns = f"{self.prefix}-br"
        ip("netns", "add", self.bridge_ns)
        self.made.append(self.bridge_ns)
        try:
            ip("link", "set", "lo", "up", ns=self.bridge_ns)
            if self.wire is None:
                ip("link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
                ip("link", "set", "br0", "up", ns=self.bridge_ns)
            else:
                self._start_forwarder(self.wire)
        except BaseException:
            self.close()
            raise

    @property
    def subnet(self) -> str:
        """Every node's address is in it (for a server's allow list)."""
        return f"10.77.{self.number}.0/24"

    def _start_forwarder(self, wire: Wire) -> None:
        argv = [
            sys.executable, str(WIRE_PROGRAM),
            "--delay-ms", repr(wire.delay_s * 1000),
            "--loss", repr(wire.loss),
            "--mtu", str(wire.mtu),
            *(["--seed", str(wire.seed)] if wire.seed is not None else []),
        ]  # fmt: skip
        # `ip netns exec` execs the forwarder itself, so the PID is the forwarder's.
        self.forwarder = subprocess.Popen(
            ["ip", "netns", "exec", self.bridge_ns, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # one line each way at a time: nothing to buffer, nothing left behind
        )
        answer = self._read_answer()
        if answer != "ready":
            raise RuntimeError(f"the wire forwarder did not start: {answer!r}")

    def _read_answer(self) -> str:
        assert self.forwarder is not None
        assert self.forwarder.stdout is not None
        out = self.forwarder.stdout
        ready, _, _ = select.select([out], [], [], WIRE_ANSWER_TIMEOUT_S)
        line = out.readline().decode().strip() if ready else ""
        if not line:
            raise RuntimeError(f"the wire forwarder did not answer (exit {self.forwarder.poll()})")
        return line

    def _tell(self, command: str) -> str:
        assert self.forwarder is not None
        assert self.forwarder.stdin is not None
        self.forwarder.stdin.write(command.encode() + b"\n")
        answer = self._read_answer()
        if answer.startswith("error"):
            raise RuntimeError(f"the wire forwarder: {command}: {answer}")
        return answer

    def node(self, name: str) -> Node:
        n = len(self.nodes) + 1
        ns = f"{self.prefix}-{name}"
        ip("netns", "add", ns)
        self.made.append(ns)
        # Interface names are at most 15 bytes; the node's end is made in a namespace of the
        # lab's, then moved, so nothing ever appears in the test's own namespace.
        outer, inner = f"v{self.number}n{n}b", "eth0"
        if self.wire is None:
            ip("link", "add", inner, "type", "veth", "peer", "name", outer, ns=ns)
            ip("link", "set", outer, "netns", self.bridge_ns, ns=ns)
            ip("link", "set", outer, "master", "br0", ns=self.bridge_ns)
            ip("link", "set", outer, "up", ns=self.bridge_ns)
        else:
            # The forwarder makes the tap in its namespace and keeps its fd; moved into the
            # node's namespace, it stays attached to that fd.
            self._tell(f"tap {outer}")
            ip("link", "set", outer, "netns", ns, ns=self.bridge_ns)
            ip("link", "set", outer, "name", inner, ns=ns)
            ip("link", "set", inner, "mtu", str(self.wire.mtu), ns=ns)
        addr = f"10.77.{self.number}.{n}"
        ip("addr", "add", f"{addr}/24", "dev", inner, ns=ns)
        ip("link", "set", inner, "up", ns=ns)
        ip("link", "set", "lo", "up", ns=ns)
        node = Node(name, ns, addr, outer)
        self.nodes.append(node)
        return node

    def partition(self, node: Node) -> None:
        """Cut `node` off from every other: its packets go nowhere, its processes run on."""
        if self.wire is None:
            ip("link", "set", node.bridge_end, "down", ns=self.bridge_ns)
        else:
            self._tell(f"cut {node.bridge_end}")

    def heal(self, node: Node) -> None:
        if self.wire is None:
            ip("link", "set", node.bridge_end, "up", ns=self.bridge_ns)
        else:
            self._tell(f"heal {node.bridge_end}")

    def set_wire(self, delay_s: float, loss: float) -> None:
        """Change the wire's delay and loss from now on (frames already held keep theirs)."""
        self._tell(f"set {delay_s!r} {loss!r}")

    def wire_stats(self) -> dict[str, int]:
        """The forwarder's counts so far: frames and bytes forwarded, `dropped_loss` (by the
        loss draw), `dropped_cut` (by a partition), `undeliverable`."""
        stats: dict[str, Any] = json.loads(self._tell("stats").split(" ", 1)[1])
        return {k: int(v) for k, v in stats.items()}

    def _stop_forwarder(self) -> None:
        proc, self.forwarder = self.forwarder, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()  # it returns when its stdin ends
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    def close(self) -> None:
        """Stop the forwarder (its taps go with it) and remove every namespace this lab made
        (their veths go with them)."""
        errors = []
        try:
            self._stop_forwarder()
        except Exception as exc:
            errors.append(f"stopping the wire forwarder: {exc}")
        for ns in reversed(self.made):
            try:
                ip("netns", "del", ns)
            except RuntimeError as exc:
                errors.append(str(exc))
        self.made.clear()
        if errors:
            raise RuntimeError("; ".join(errors))
