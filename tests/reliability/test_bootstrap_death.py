"""`swarm local` publishes every DHT peer of the swarm: it outlives its bootstrap peer."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ptune_search.swarm.launcher import read_peers_file
from ptune_search.swarm.protocol import ServerState
from ptune_search.swarm.setting_flags import setting_flags
from tests.reliability.swarm_fault_testing import FAST_RECORDS, RECORD_TTL, swarm_classifier, tiny_llama, train  # noqa: F401 - fixtures
from tests.swarm.swarm_testing import classification_batch, living

NUM_BLOCKS = 4  # tiny-llama
# Clients re-read the DHT every second: routing goes through the surviving peers while the test watches.
CLIENT = dict(tuning_mode="ptune", pre_seq_len=2, request_timeout=10.0, block_wait_timeout=10.0, route_update_period=1)


def peer_id_of(maddr: str) -> str:
    return maddr.rsplit("/p2p/", 1)[1]


@pytest.mark.slow
def test_clients_train_and_join_after_the_bootstrap_peer_died(tmp_path, tiny_llama, swarm_classifier):
    peers_file, log_dir = tmp_path / "peers.txt", tmp_path / "logs"
    command = [
        sys.executable,
        "-m",
        "ptune_search.swarm",
        "local",
        "--model",
        str(tiny_llama),
        "--servers",
        "2",
        "--peers-file",
        str(peers_file),
        "--log-dir",
        str(log_dir),
        *setting_flags(FAST_RECORDS),
    ]
    with open(tmp_path / "local.log", "wb") as log:
        launcher = subprocess.Popen(command, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    groups: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while not peers_file.exists():
            assert launcher.poll() is None, (tmp_path / "local.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the local swarm did not get ready"
            time.sleep(0.2)
        children = {p.pid: " ".join(p.cmdline()) for p in psutil.Process(launcher.pid).children()}
        groups = set(children)  # each child leads its own process group (with its p2p daemon)
        (bootstrap_pid,) = [pid for pid, cmdline in children.items() if " dht " in cmdline]
        peers = read_peers_file(peers_file)
        servers = [json.loads(path.read_text()) for path in sorted(log_dir.glob("server-*.json"))]
        assert len(servers) == 2
        assert {peer_id_of(maddr) for maddr in peers} == {peer_id_of(peers[0])} | {s["peer_id"] for s in servers}
        assert all(maddr in peers for server in servers for maddr in server["maddrs"])

        batches = [classification_batch(seed) for seed in range(4)]
        existing = swarm_classifier(peers, **CLIENT)
        train(existing, batches, 2)

        os.killpg(bootstrap_pid, signal.SIGKILL)  # the peer and its p2p daemon, as in a crash
        assert not living(lambda p: p[2] == bootstrap_pid, wait=10)
        died = time.monotonic()
        losses = []
        while time.monotonic() - died < 3 * RECORD_TTL:  # every record now alive was stored after the death
            losses += train(existing, batches, 1)[0]
        assert all(math.isfinite(loss) for loss in losses) and len(losses) >= 2
        assert existing.model.layers.passes.stats["failed_calls"] == 0

        newcomer = swarm_classifier(peers, **CLIENT)  # the dead bootstrap peer is listed first
        router = newcomer.model.layers.router
        newcomer.model.layers.connection.run(router.refresh(), timeout=60)
        for block in range(NUM_BLOCKS):
            (record,) = router.servers_for(block).values()
            assert record.state == ServerState.ONLINE
        new_losses, _ = train(newcomer, batches, 2)
        assert all(math.isfinite(loss) for loss in new_losses)

        assert launcher.poll() is None, "the local swarm stopped when its bootstrap peer died"
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for group in [launcher.pid, *groups]:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    assert not living(lambda p: p[2] in groups | {launcher.pid}, wait=10)
