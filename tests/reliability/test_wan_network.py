"""The simulated WAN of benchmarks/wan: real namespaces, a real switch, TCP between them (needs root).

A TCP echo across two hosts shows each shape on the wire: the round trip of the delays given, jitter, loss
(a cut link reaches nobody), an upload rate; and nothing of the network is left after it closes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest

from benchmarks.wan.network import PREFIX, WanNetwork, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


def probe(network: WanNetwork, size: int = 1, here: bool = False) -> dict:
    """Probe host b from host a (``here``: from this process, on the network's own port)."""
    where = [] if here else network.exec_prefix("a")
    command = [*where, sys.executable, "-m", "tests.reliability.tcp_probe", "probe"]
    done = subprocess.run([*command, network.address("b"), str(size)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def own_namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(f"{PREFIX}{os.getpid()}-")]


def test_each_shape_shows_on_the_wire_and_nothing_is_left_after():
    with WanNetwork(["a", "b"]) as network:
        serve = [sys.executable, "-m", "tests.reliability.tcp_probe", "serve", network.address("b")]
        server = subprocess.Popen([*network.exec_prefix("b"), *serve])
        try:
            time.sleep(1.0)
            assert max(probe(network)["rtt_s"]) < 0.02  # no delay: the switch alone

            network.shape("a", delay_ms=10)
            network.shape("b", delay_ms=15)  # one way a -> b: 25 ms; round trip 50 ms
            rtts = probe(network)["rtt_s"]
            assert 0.05 <= min(rtts) and max(rtts) < 0.08, rtts

            network.shape("b", jitter_ms=20)
            rtts = probe(network)["rtt_s"]
            assert min(rtts) >= 0.05 and statistics.pstdev(rtts) > 0.002, rtts

            network.shape("b", jitter_ms=0)
            network.rate("a", 8)  # 1 MB/s up from a: 2 MB take 2 s
            assert probe(network, size=2_000_000)["echo_s"] > 1.6
            network.rate("a", None)
            assert probe(network, size=2_000_000)["echo_s"] < 1.0

            network.shape("b", loss=1.0)  # every frame lost: nobody reaches it
            assert "error" in probe(network) and "error" in probe(network, here=True)
            network.shape("b", loss=0.0, cut=True)  # cut off from the hosts, not from the network's own port
            assert "error" in probe(network) and "rtt_s" in probe(network, here=True)
            network.shape("b", cut=False)
            assert "rtt_s" in probe(network)
            assert network.switch_stats()["lost"] > 0
            assert len(own_namespaces()) == 2
        finally:
            server.kill()
            server.wait()
    assert own_namespaces() == []
