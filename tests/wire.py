"""A userspace link emulator for tests/netlab.py: a learning switch between TAP devices that
delays every frame by a fixed time and drops a random fraction of them.

Why it exists: this machine's kernel has no sch_netem (`tc qdisc add ... netem` says "Specified
qdisc kind is unknown") and no modules to load, so delay and loss cannot be had from the
kernel. A TAP device hands whole Ethernet frames to a process, so that process can be the
wire: read a frame from one node's tap, hold it for `delay`, drop it with probability `loss`,
write it to the tap of the node that owns the destination MAC (or to every other tap for
broadcast and unknown destinations, as a switch floods).

    python -m tests.wire --delay-ms 0.5 --loss 0.005 --mtu 9000     # in the lab's namespace

It runs in a process of its own (started, talked to and killed by PID by `NetLab`), so that
forwarding never waits on the test process and the test never waits on forwarding. It is
told what to do in lines on stdin and answers each with one line on stdout:

    tap NAME        make a TAP device NAME (in this process's network namespace) and switch
                    its frames; the lab then moves it into a node's namespace (the open fd
                    stays attached to it). Answer: "ok NAME".
    cut NAME        drop every frame from and to NAME (a partition); "heal NAME" ends it.
    set DELAY_S LOSS   change the delay (seconds, one way) and the loss fraction.
    stats           answer "stats {json}": frames and bytes forwarded, frames dropped by the
                    loss draw, dropped by a cut, and undeliverable (a write that failed).

Invariants: a frame is held in one FIFO whose due times never decrease (a constant delay,
applied in arrival order), so frames are never reordered, on one path or between paths; a
dropped frame is dropped once, on its way in, whatever the number of ports it would go to.
The TAP devices are not persistent: when this process dies, by SIGKILL too, they vanish.

What it costs: every frame crosses user space twice (read, write) in one Python process on
one core, so the wire has a throughput ceiling of its own (tens to hundreds of MB/s, by MTU;
`make bench` reports it beside the loopback figure). A large MTU (9000 by default, the
nodes' side set to match) keeps the frame rate, hence that cost, down.
"""

from __future__ import annotations

import argparse
import collections
import errno
import fcntl
import json
import os
import random
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
ETH_HEADER = 14
# Frames read from one tap before looking at the others and the queue: bounds the unfairness
# between ports while keeping select() calls rare when traffic is heavy.
BURST = 64
# Below this, waiting for a frame's due time is a spin rather than a select(): the kernel's
# timer slack (50 µs) and a wake-up would otherwise add as much again to a 500 µs delay.
SPIN_S = 0.0002


class Switch:
    def __init__(self, delay_s: float, loss: float, mtu: int, seed: int | None) -> None:
        self.delay_s = delay_s
        self.loss = loss
        self.frame_max = mtu + ETH_HEADER + 4  # a VLAN tag, should a node send one
        self.random = random.Random(seed)
        self.ports: dict[int, str] = {}  # fd -> tap name
        self.fds: dict[str, int] = {}  # tap name -> fd
        self.cut: set[int] = set()
        self.macs: dict[bytes, int] = {}  # learnt source MAC -> fd it came from
        # (due time, input fd, frame), in due-time order because the delay is constant.
        self.queue: collections.deque[tuple[float, int, bytes]] = collections.deque()
        self.stats = {
            "frames": 0,
            "bytes": 0,
            "dropped_loss": 0,
            "dropped_cut": 0,
            "undeliverable": 0,
        }

    def add_tap(self, name: str) -> None:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        except OSError:
            os.close(fd)
            raise
        self.ports[fd] = name
        self.fds[name] = fd

    def receive(self, fd: int, now: float) -> None:
        for _ in range(BURST):
            try:
                frame = os.read(fd, self.frame_max)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EIO:  # the node's side went down meanwhile
                    return
                raise
            if len(frame) < ETH_HEADER:
                continue
            if fd in self.cut:
                self.stats["dropped_cut"] += 1
                continue
            self.macs[frame[6:12]] = fd
            if self.loss and self.random.random() < self.loss:
                self.stats["dropped_loss"] += 1
                continue
            self.queue.append((now + self.delay_s, fd, frame))

    def deliver_due(self, now: float) -> None:
        queue = self.queue
        while queue and queue[0][0] <= now:
            _, source, frame = queue.popleft()
            dest = frame[0:6]
            out = self.macs.get(dest) if not dest[0] & 1 else None  # multicast bit: flood
            targets = [out] if out is not None else [fd for fd in self.ports if fd != source]
            for fd in targets:
                if fd in self.cut:
                    self.stats["dropped_cut"] += 1
                    continue
                try:
                    os.write(fd, frame)
                except OSError:  # the node's side is down, or its queue is full
                    self.stats["undeliverable"] += 1
                    continue
                self.stats["frames"] += 1
                self.stats["bytes"] += len(frame)

    def command(self, line: str) -> str:
        words = line.split()
        if not words:
            return "error empty command"
        try:
            if words[0] == "tap" and len(words) == 2:
                self.add_tap(words[1])
                return f"ok {words[1]}"
            if words[0] in ("cut", "heal") and len(words) == 2:
                fd = self.fds[words[1]]
                if words[0] == "cut":
                    self.cut.add(fd)
                else:
                    self.cut.discard(fd)
                return f"ok {words[0]}"
            if words[0] == "set" and len(words) == 3:
                self.delay_s, self.loss = float(words[1]), float(words[2])
                return "ok set"
            if words[0] == "stats":
                return "stats " + json.dumps(self.stats)
        except (OSError, KeyError, ValueError) as exc:
            return f"error {exc!r}"
        return f"error unknown command {line.strip()!r}"

    def run(self, control: int, answer: int) -> None:
        pending = b""
        while True:
            now = time.monotonic()
            self.deliver_due(now)
            if self.queue:
                wait = self.queue[0][0] - time.monotonic()
                if wait < SPIN_S:
                    wait = 0.0
            else:
                wait = None
            readable, _, _ = select.select([control, *self.ports], [], [], wait)
            now = time.monotonic()
            for fd in readable:
                if fd != control:
                    self.receive(fd, now)
                    continue
                data = os.read(control, 4096)
                if not data:  # the lab closed our stdin: it is done with us
                    return
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    reply = self.command(line.decode()) + "\n"
                    os.write(answer, reply.encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.wire", description=__doc__)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one way, per frame")
    parser.add_argument("--loss", type=float, default=0.0, help="fraction of frames dropped")
    parser.add_argument("--mtu", type=int, default=9000, help="the largest frame to expect")
    parser.add_argument("--seed", type=int, help="for the loss draw (default: random)")
    args = parser.parse_args(argv)
    switch = Switch(args.delay_ms / 1000, args.loss, args.mtu, args.seed)
    os.write(sys.stdout.fileno(), b"ready\n")
    switch.run(sys.stdin.fileno(), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
