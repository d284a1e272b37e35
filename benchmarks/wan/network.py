"""Hosts in network namespaces on one shaped switch, built on entry and removed on exit, also on failure.

Each host is a namespace ``ptwan<pid>-<index>`` with one TAP on a :mod:`delay_switch` at an address of
198.18.0.0/16 (the range set aside for benchmarks, RFC 2544). The process that builds the network gets a port
of its own (``control``), so that it can start a swarm in the namespaces and ask its servers for their
counters. Links are shaped while the network runs: :meth:`WanNetwork.shape` (delay, jitter, loss, on the
switch; a host cut off still answers this process) and :meth:`WanNetwork.rate` (``tc tbf`` on the host's TAP:
its upload).

Example::

    with WanNetwork(["bootstrap", "server-0", "clients-0"]) as network:
        network.shape("clients-0", delay_ms=25)        # 50 ms more round trip to and from that host
        subprocess.run([*network.exec_prefix("server-0"), "ping", "-c1", network.address("clients-0")])

Needs root and ``ip netns`` (:func:`unavailable_reason` says why not, else None). Namespaces left by a run
that was SIGKILLed are removed by the next run (their pid is gone).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Optional, Sequence

PREFIX = "ptwan"
SUBNET_PREFIX = "198.18"
MTU = 16000  # fewer, larger frames: the switch's cost is per frame
CONTROL = "control"


def unavailable_reason() -> Optional[str]:
    """Why namespaces cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def remove_stale_namespaces() -> None:
    """Namespaces of earlier runs whose process is gone (SIGKILLed before it could clean up)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    for match in re.finditer(rf"^{PREFIX}(\d+)-\d+", listing, re.MULTILINE):
        if not os.path.exists(f"/proc/{match.group(1)}"):
            subprocess.run(["ip", "netns", "delete", match.group(0)], capture_output=True)


class WanNetwork:
    def __init__(self, hosts: Sequence[str], seed: int = 0):
        if CONTROL in hosts or len(set(hosts)) != len(hosts):
            raise ValueError(f"host names must be unique and not {CONTROL!r}: {list(hosts)}")
        if len(hosts) > 250:
            raise ValueError(f"at most 250 hosts (got {len(hosts)})")
        self.hosts = list(hosts)
        self.seed = seed
        tag = f"{PREFIX}{os.getpid()}"
        self.netns = {host: f"{tag}-{index}" for index, host in enumerate(self.hosts)}
        self.ports = {host: index for index, host in enumerate([*self.hosts, CONTROL])}
        # Interface names hold at most 15 characters: "pw", a pid of up to 7 digits, "t", an index of up to 3.
        self.taps = {host: f"pw{os.getpid()}t{index}" for host, index in self.ports.items()}
        self.addresses = {host: f"{SUBNET_PREFIX}.0.{index + 1}" for host, index in self.ports.items()}
        self.addresses[CONTROL] = f"{SUBNET_PREFIX}.255.254"
        self._switch: Optional[subprocess.Popen] = None
        self._made: list[str] = []

    def __enter__(self) -> "WanNetwork":
        try:
            remove_stale_namespaces()
            for host in self.hosts:
                subprocess.run(["ip", "netns", "add", self.netns[host]], check=True, capture_output=True)
                self._made.append(self.netns[host])
            self._start_switch()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start_switch(self) -> None:
        ports = [
            dict(name=self.taps[host], netns=self.netns.get(host), address=f"{self.addresses[host]}/16", mtu=MTU)
            for host in self.ports
        ]
        self._switch = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.wan.delay_switch"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C reaches the benchmark, which then closes the switch in order
        )
        self._send({"ports": ports, "seed": self.seed, "spared": [self.ports[CONTROL]]})
        answer = self._switch.stdout.readline()
        if not answer or not json.loads(answer).get("ready"):
            raise RuntimeError(f"the delay switch did not start (exit code {self._switch.poll()})")

    def _send(self, request: dict) -> None:
        assert self._switch is not None and self._switch.stdin is not None
        self._switch.stdin.write(json.dumps(request) + "\n")
        self._switch.stdin.flush()

    def address(self, host: str) -> str:
        return self.addresses[host]

    def exec_prefix(self, host: str) -> list[str]:
        """Prepend to a command to run it on ``host``."""
        return ["ip", "netns", "exec", self.netns[host]]

    def shape(
        self,
        host: str,
        *,
        delay_ms: Optional[float] = None,
        jitter_ms: Optional[float] = None,
        loss: Optional[float] = None,
        cut: Optional[bool] = None,
    ) -> None:
        """Shape ``host``'s link: one-way delay and jitter to the switch, the share of frames lost on it, and
        whether it is cut off from every host (this process's port still reaches it). Returns once it holds."""
        fields = {"delay_ms": delay_ms, "jitter_ms": jitter_ms, "loss": loss, "cut": cut}
        self._send({"shape": self.ports[host], **{k: v for k, v in fields.items() if v is not None}})
        answer = self._switch.stdout.readline()
        if not answer or not json.loads(answer).get("ok"):
            raise RuntimeError(f"the delay switch did not take the shape (exit code {self._switch.poll()})")

    def shape_all(self, **shape: float) -> None:
        for host in self.hosts:
            self.shape(host, **shape)

    def rate(self, host: str, mbit: Optional[float]) -> None:
        """Limit ``host``'s upload to ``mbit`` Mbit/s (None: no limit)."""
        tc = ["tc", "-n", self.netns[host], "qdisc"]
        subprocess.run([*tc, "del", "dev", self.taps[host], "root"], capture_output=True)
        if mbit is not None:
            burst = max(MTU * 2, int(mbit * 1e6 / 8 / 100))  # 10 ms of the rate, at least two frames
            limit = ["rate", f"{mbit}mbit", "burst", str(burst), "latency", "200ms"]
            subprocess.run([*tc, "add", "dev", self.taps[host], "root", "tbf", *limit], check=True, capture_output=True)

    def switch_stats(self) -> dict:
        """Frames, bytes, lost frames and the peak of frames held for their time, since the start."""
        assert self._switch is not None and self._switch.stdout is not None
        self._send({"stats": True})
        return json.loads(self._switch.stdout.readline())

    def close(self) -> None:
        """Stop the switch (its TAPs vanish with it) and delete every namespace this network made."""
        if self._switch is not None:
            with contextlib.suppress(OSError):
                self._switch.stdin.close()
            try:
                self._switch.wait(10)
            except subprocess.TimeoutExpired:
                self._switch.kill()
                self._switch.wait()
            self._switch = None
        for netns in self._made:
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
        self._made.clear()
