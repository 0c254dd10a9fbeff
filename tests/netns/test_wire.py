"""The userspace wire itself (tests/wire.py through tests/netlab.py): it delays, drops a
fraction of frames, never reorders, and cuts a node off and lets it back. The tests across
lossy hops rely on each of these, and on nothing else of it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.netlab import NetLab, Node, Wire, tcp_rtt_s

WIRE = Wire(delay_s=0.001, loss=0.05, seed=16)
DATAGRAMS = 2000


@pytest.fixture
def lab() -> Iterator[NetLab]:
    lab = NetLab(wire=WIRE)
    try:
        yield lab
    finally:
        lab.close()


def test_the_wire_delays_drops_and_keeps_order(lab: NetLab) -> None:
    a, b = lab.node("a"), lab.node("b")
    rtt = tcp_rtt_s(a, b.addr)
    assert rtt >= 2 * WIRE.delay_s
    print(f"\nround trip with {WIRE.delay_s * 1000:g} ms each way: {rtt * 1000:.2f} ms")

    ready = threading.Event()
    received: list[int] = []

    def receive() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((b.addr, 5000))
            sock.settimeout(2)
            ready.set()
            try:
                while True:
                    received.append(int(sock.recv(64)))
            except TimeoutError:
                return

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for n in range(DATAGRAMS):
                sock.sendto(str(n).encode(), (b.addr, 5000))
                if n % 50 == 0:
                    time.sleep(0.001)  # within the receiver's socket buffer

    before = lab.wire_stats()
    receiver = threading.Thread(target=b.call, args=(receive,))
    receiver.start()
    assert ready.wait(10)
    a.call(send)
    receiver.join(30)
    dropped = lab.wire_stats()["dropped_loss"] - before["dropped_loss"]
    assert received == sorted(received), "the wire reordered datagrams"
    assert 0 < DATAGRAMS - len(received) <= dropped
    print(f"{DATAGRAMS - len(received)} of {DATAGRAMS} datagrams lost at {WIRE.loss:.0%}")


def connects(src: Node, dst: Node) -> bool:
    """Whether `src` reaches `dst` within a second (a refused connect is an answer)."""

    def attempt() -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            try:
                sock.connect((dst.addr, 9))
            except ConnectionRefusedError:
                return True
            except TimeoutError:
                return False
        return True

    return any(src.call(attempt) for _ in range(3))  # a lost SYN or RST is not a cut


def test_the_wire_partitions_and_heals(lab: NetLab) -> None:
    a, b = lab.node("a"), lab.node("b")
    assert connects(a, b)
    lab.partition(b)
    assert not connects(a, b)
    assert lab.wire_stats()["dropped_cut"] > 0
    lab.heal(b)
    assert connects(a, b)
