"""A multi-host test bed on one machine: each server and the client side in a network
namespace of its own, joined by veth pairs to a bridge in a namespace of the test's own.

    lab = NetLab()            # made by the test, removed by `close()` even when it fails
    t = lab.node("t")         # a namespace with one address, 10.77.<lab>.<n>/24
    lab.partition(t)          # its link to the bridge goes down: cut off, not killed
    lab.heal(t)

Addresses exist only inside the namespaces, so no traffic can leave them. Servers run under
`ip netns exec` (which gives them a mount namespace of their own too, harmless for a daemon);
a FUSE mount runs under `nsenter --net` only, so that its mount is seen by the test.

What it cannot show: delay and loss (`tc netem`) need the kernel's sch_netem, which this
machine's kernel lacks; partitions need only links, which it has.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

NETNS_DIR = Path("/run/netns")
_labs = itertools.count(1)


def ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


@dataclass
class Node:
    name: str
    ns: str
    addr: str  # without the prefix length
    bridge_end: str  # the veth end on the bridge, named in the bridge's namespace

    def exec_argv(self, argv: list[str]) -> list[str]:
        """Run `argv` in this node's network (and a private mount) namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def net_argv(self, argv: list[str]) -> list[str]:
        """Run `argv` in this node's network namespace only (a FUSE mount the test sees)."""
        return ["nsenter", f"--net={NETNS_DIR / self.ns}", *argv]


@dataclass
class NetLab:
    number: int = field(default_factory=lambda: (os.getpid() % 200 + next(_labs)) % 250 + 1)
    nodes: list[Node] = field(default_factory=list)
    made: list[str] = field(default_factory=list)  # namespaces, in the order made

    def __post_init__(self) -> None:
        self.prefix = f"dfs{os.getpid() % 10000}x{self.number}"
        self.bridge_ns = f"{self.prefix}-br"
        ip("netns", "add", self.bridge_ns)
        self.made.append(self.bridge_ns)
        ip("link", "set", "lo", "up", ns=self.bridge_ns)
        ip("link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
        ip("link", "set", "br0", "up", ns=self.bridge_ns)

    def node(self, name: str) -> Node:
        n = len(self.nodes) + 1
        ns = f"{self.prefix}-{name}"
        ip("netns", "add", ns)
        self.made.append(ns)
        # Interface names are at most 15 bytes; made in the node's namespace, then one end
        # moved to the bridge's, so nothing ever appears in the test's own namespace.
        outer, inner = f"v{self.number}n{n}b", "eth0"
        ip("link", "add", inner, "type", "veth", "peer", "name", outer, ns=ns)
        ip("link", "set", outer, "netns", self.bridge_ns, ns=ns)
        ip("link", "set", outer, "master", "br0", ns=self.bridge_ns)
        ip("link", "set", outer, "up", ns=self.bridge_ns)
        addr = f"10.77.{self.number}.{n}"
        ip("addr", "add", f"{addr}/24", "dev", inner, ns=ns)
        ip("link", "set", inner, "up", ns=ns)
        ip("link", "set", "lo", "up", ns=ns)
        node = Node(name, ns, addr, outer)
        self.nodes.append(node)
        return node

    def partition(self, node: Node) -> None:
        """Cut `node` off from every other: its packets go nowhere, its processes run on."""
        ip("link", "set", node.bridge_end, "down", ns=self.bridge_ns)

    def heal(self, node: Node) -> None:
        ip("link", "set", node.bridge_end, "up", ns=self.bridge_ns)

    def close(self) -> None:
        """Remove every namespace this lab made (their veths go with them)."""
        errors = []
        for ns in reversed(self.made):
            try:
                ip("netns", "del", ns)
            except RuntimeError as exc:
                errors.append(str(exc))
        self.made.clear()
        if errors:
            raise RuntimeError("; ".join(errors))
