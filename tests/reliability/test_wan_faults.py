"""Faults on the links of a simulated WAN while clients train (benchmarks/wan_swarm.py --faults; needs root).

One replica's host is cut off, then healed; one link loses 10 % of its frames; one upload drops to 1 Mbit/s.
Steps go on through the other replica, each with the loss and grads of the first step (the blocks are
frozen and each client's batch fixed: a lost, garbled or mixed-up answer would show); the cut server gets
no request while cut off and takes requests again once healed.
"""

from __future__ import annotations

import pytest

from benchmarks.wan.network import unavailable_reason
from tests.test_benchmarks import of, run_benchmark

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]

FAULTS = ["--faults", "--servers", "2", "--replicas", "2", "--client-hosts", "1", "--fault-clients", "2"]


def test_steps_go_on_through_the_replica_and_the_cut_server_comes_back(tmp_path):
    args = [*FAULTS, "--seconds", "4", "--partition-s", "8", "--heal-s", "20"]
    records = run_benchmark("wan_swarm", args, tmp_path)
    phases = {record["phase"]: record for record in of(records, "wan_swarm_fault")}
    assert list(phases) == ["steady", "partition", "healed", "loss_10", "slow_link"]
    for phase, record in phases.items():
        assert record["steps"] > 0, (phase, record)
        assert record["failed_steps"] == 0 and record["wrong_results"] == 0, (phase, record)
    (summary,) = of(records, "wan_swarm_faults_summary")
    assert summary["cut_server_requests"]["partition"] == 0, summary
    assert summary["cut_server_requests"]["healed"] > 0, summary
    assert summary["failed_steps"] == 0 and summary["wrong_results"] == 0
    (switch,) = of(records, "wan_swarm_switch")
    assert switch["lost"] > 0  # the partition and the lossy link dropped frames
