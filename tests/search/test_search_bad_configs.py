"""A bad config fails fast, says what is wrong, and starts nothing."""

from __future__ import annotations

import time

import hivemind
import pytest

from tests.search.search_process import assert_no_survivors


@pytest.fixture(scope="module")
def unreachable_peer() -> str:
    """The multiaddr of a DHT peer that existed a moment ago: well-formed, and nobody listens there."""
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    address = str(dht.get_visible_maddrs()[0])
    dht.shutdown()
    return address


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["budget.max_stepz=5"], "budget.max_stepz: unknown field"),
        (["search_space.pre_seq_len.low=-3"], "search_space.pre_seq_len.low: -3 is not allowed"),
        (["search_space.lr.low=0.1", "search_space.lr.high=0.01"], "search_space.lr.low: 0.1 is not allowed"),
        (["search_space.tuning_modes=[ptune, prefix]"], "search_space.tuning_modes"),
        (["model=/nonexistent/llama"], "model: /nonexistent/llama does not exist"),
    ],
)
def test_invalid_config_fails_before_anything_starts(run_search, tmp_path, overrides, message):
    started = time.monotonic()
    search = run_search(overrides)
    assert search.wait(timeout=60) != 0
    assert message in search.log()
    assert time.monotonic() - started < 30
    assert not (tmp_path / "search").exists()
    assert not search.seen, f"a bad config started processes: {search.seen}"


def test_unreachable_initial_peers_fail_before_ray_starts(run_search, tmp_path, unreachable_peer):
    search = run_search(["swarm.mode=external", f"swarm.initial_peers=[{unreachable_peer}]"])
    assert search.wait(timeout=90) != 0
    assert "could not join the swarm" in search.log() and unreachable_peer in search.log()
    assert not (tmp_path / "search").exists()
    assert_no_survivors(search)
