"""`swarm local` as a command: ready when every block is online, stops everything on a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from swarm_testing import classification_batch, living, swarm_config

from ptune_search.swarm.client.remote_chain import RemoteBlockChain
from ptune_search.swarm.launcher import read_peers_file


def descendants(pid: int) -> set[int]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            table[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in table.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_local_swarm_command_serves_until_a_signal_and_leaves_no_process(tmp_path, swarm_model, stop_signal):
    peers_file = tmp_path / "peers.txt"
    command = [
        sys.executable,
        "-m",
        "ptune_search.swarm",
        "local",
        "--model",
        str(swarm_model),
        "--servers",
        "2",
        "--peers-file",
        str(peers_file),
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    launcher = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while not peers_file.exists():
            assert launcher.poll() is None, launcher.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the local swarm did not get ready"
            time.sleep(0.2)
        started = descendants(launcher.pid)
        p2pds = [pid for pid in started if open(f"/proc/{pid}/comm").read().startswith("p2pd")]
        assert len(p2pds) == 3  # the bootstrap peer's and the two servers'; the readiness probe's is gone

        chain = RemoteBlockChain.connect(swarm_config(swarm_model, None, initial_peers=read_peers_file(peers_file)))
        try:
            batch = classification_batch(0)
            hidden = torch.randn(4, 12, 64)
            assert chain(hidden, batch["attention_mask"]).shape == (4, 12, 64)
        finally:
            chain.close()

        launcher.send_signal(stop_signal)
        assert launcher.wait(60) == 0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        for group in [launcher.pid, *started]:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    assert not living(lambda p: p[0] in started, wait=10)


@pytest.mark.parametrize("share_cores", [True, False])
def test_servers_that_size_their_compute_team_get_openmp_default_one_thread(tmp_path, swarm_model, share_cores):
    """A server sharing the cores sets its compute thread's team itself: OpenMP's default is then 1 (every other
    thread), which keeps its team's worker on the core (docs/benchmarks.md); a server without either keeps
    the caller's environment."""
    from ptune_search.swarm.launcher import LocalSwarm

    with LocalSwarm(swarm_model, servers=1, log_dir=tmp_path, share_cores=share_cores) as swarm:
        (server,) = swarm.servers
        environ = dict(
            line.split("=", 1) for line in open(f"/proc/{server.pid}/environ").read().split("\0") if "=" in line
        )
    assert environ.get("OMP_NUM_THREADS") == ("1" if share_cores else os.environ.get("OMP_NUM_THREADS"))
