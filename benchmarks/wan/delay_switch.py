"""A user-space Ethernet switch between TAP ports, each port's link shaped: one-way delay, jitter and loss.

This kernel has no ``netem`` qdisc, so latency cannot be added by ``tc``. A TUN/TAP device hands its frames to
the process that opened it; this process opens one TAP per host (a network namespace), forwards every frame
to the port of its destination MAC (learnt from the sources; unknown and broadcast ones to all) and holds it
until its time: the sender's port delay plus the receiver's, plus jitter, at most one frame of the same pair
of ports overtaking none (TCP would take reordering for loss). A frame is lost with the sender's or the
receiver's loss probability; loss 1.0 cuts the host off. A host ``cut`` off reaches only the spared ports
(``spared`` in the spec: the port of the process that watches the network), a partition that leaves the
watcher its view. Every shape can change while it runs.
Rates are left to ``tc tbf`` on each TAP inside its namespace (that works on this kernel).

Why a switch and not a delaying TCP relay in front of each server: it delays every packet of every
connection, the DHT's included, in both directions, with no address to announce differently, and one
process shapes all links.

Run by :class:`benchmarks.wan.network.WanNetwork` as ``python -m benchmarks.wan.delay_switch``; it reads a
JSON line ``{"ports": [{"name", "netns", "address", "mtu"}, ...], "seed": 0}`` on stdin, creates and
configures the TAPs, prints ``{"ready": true}``, then takes commands, one JSON line each, until stdin closes:
``{"shape": i, "delay_ms": 25, "jitter_ms": 2, "loss": 0.1, "cut": false}`` (answers ``{"ok": true}`` once
it holds) and ``{"stats": true}`` (answers the counters). The spec's ``spared``: port indexes never cut.
"""

from __future__ import annotations

import dataclasses
import fcntl
import heapq
import json
import os
import random
import selectors
import struct
import subprocess
import sys
import time
from typing import Any

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
MAX_FRAME = 65536
MAX_HELD_BYTES = 256 * 1024**2  # frames held for their time beyond this are dropped, as a full router buffer would


@dataclasses.dataclass
class LinkShape:
    delay_ms: float = 0.0  # one way, between this host and the switch
    jitter_ms: float = 0.0  # uniform in [0, jitter_ms), added to the delay
    loss: float = 0.0  # probability that a frame to or from this host is lost
    cut: bool = False  # frames between this host and any port but the spared ones are lost


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def configure(port: dict[str, Any]) -> None:
    """Move the TAP into its namespace (none: it stays in this one) and give it its address, MTU and link."""
    name, netns = port["name"], port.get("netns")
    where = ["-n", netns] if netns else []
    commands = [["ip", "link", "set", name, "netns", netns], ["ip", *where, "link", "set", "lo", "up"]] if netns else []
    commands += [
        ["ip", *where, "link", "set", name, "mtu", str(port["mtu"]), "up"],
        ["ip", *where, "addr", "add", port["address"], "dev", name],
    ]
    for command in commands:
        subprocess.run(command, check=True, capture_output=True)


class DelaySwitch:
    def __init__(self, fds: list[int], seed: int = 0, spared: frozenset[int] = frozenset()):
        self.fds, self.spared = fds, spared
        self.shapes = [LinkShape() for _ in fds]
        self.random = random.Random(seed)
        self.port_of_mac: dict[bytes, int] = {}
        self.held: list[tuple[float, int, int, bytes]] = []  # (due, sequence, port, frame)
        self.held_bytes = 0
        self.sequence = 0
        self.last_due: dict[tuple[int, int], float] = {}
        self.stats = {"frames": 0, "bytes": 0, "lost": 0, "dropped_full": 0, "peak_held_bytes": 0}

    def receive(self, port: int, frame: bytes, now: float) -> None:
        self.stats["frames"] += 1
        self.stats["bytes"] += len(frame)
        destination, source = frame[:6], frame[6:12]
        self.port_of_mac[source] = port
        if destination[0] & 1 or destination not in self.port_of_mac:  # broadcast, multicast, not learnt yet
            targets = [other for other in range(len(self.fds)) if other != port]
        else:
            targets = [self.port_of_mac[destination]]
        sender = self.shapes[port]
        for target in targets:
            receiver = self.shapes[target]
            cut = (sender.cut or receiver.cut) and port not in self.spared and target not in self.spared
            if cut or self.random.random() < sender.loss or self.random.random() < receiver.loss:
                self.stats["lost"] += 1
                continue
            if self.held_bytes + len(frame) > MAX_HELD_BYTES:
                self.stats["dropped_full"] += 1
                continue
            delay = sender.delay_ms + receiver.delay_ms + self.random.random() * (sender.jitter_ms + receiver.jitter_ms)
            due = max(now + delay / 1000, self.last_due.get((port, target), 0.0))
            self.last_due[(port, target)] = due
            self.sequence += 1
            heapq.heappush(self.held, (due, self.sequence, target, frame))
            self.held_bytes += len(frame)
            self.stats["peak_held_bytes"] = max(self.stats["peak_held_bytes"], self.held_bytes)

    def deliver_due(self, now: float) -> None:
        while self.held and self.held[0][0] <= now:
            _, _, target, frame = heapq.heappop(self.held)
            self.held_bytes -= len(frame)
            try:
                os.write(self.fds[target], frame)
            except OSError:  # the namespace's side is down or its queue is full: the frame is lost
                self.stats["lost"] += 1

    def next_timeout(self, now: float) -> float | None:
        return max(0.0, self.held[0][0] - now) if self.held else None


def command(switch: DelaySwitch, line: str) -> None:
    request = json.loads(line)
    if "shape" in request:
        shape = switch.shapes[int(request["shape"])]
        for field in ("delay_ms", "jitter_ms", "loss"):
            if field in request:
                setattr(shape, field, float(request[field]))
        if "cut" in request:
            shape.cut = bool(request["cut"])
        print(json.dumps({"ok": True}), flush=True)
    if request.get("stats"):
        print(json.dumps(switch.stats), flush=True)


class LineReader:
    """Complete lines from a file descriptor, read unbuffered: a selector sees what Python has not read."""

    def __init__(self, fd: int):
        self.fd, self.pending = fd, bytearray()

    def lines(self) -> list[str] | None:
        """The lines completed by one read; None at end of file."""
        data = os.read(self.fd, 65536)
        if not data:
            return None
        self.pending.extend(data)
        *lines, rest = self.pending.split(b"\n")
        self.pending[:] = rest
        return [line.decode() for line in lines if line.strip()]


def main() -> None:
    reader = LineReader(sys.stdin.fileno())
    lines: list[str] = []
    while not lines:
        read = reader.lines()
        if read is None:
            return
        lines = read
    spec = json.loads(lines.pop(0))
    fds = [open_tap(port["name"]) for port in spec["ports"]]
    for port in spec["ports"]:
        configure(port)
    switch = DelaySwitch(fds, spec.get("seed", 0), frozenset(spec.get("spared", ())))
    for line in lines:
        command(switch, line)
    selector = selectors.DefaultSelector()
    for index, fd in enumerate(fds):
        selector.register(fd, selectors.EVENT_READ, index)
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        for key, _ in selector.select(switch.next_timeout(time.monotonic())):
            if key.data is None:
                commands = reader.lines()
                if commands is None:  # the parent went away: the TAPs vanish with this process
                    return
                for line in commands:
                    command(switch, line)
                continue
            now = time.monotonic()
            while True:
                try:
                    frame = os.read(key.fd, MAX_FRAME)
                except BlockingIOError:
                    break
                switch.receive(key.data, frame, now)
        switch.deliver_due(time.monotonic())


if __name__ == "__main__":
    main()
