"""A bad config fails fast, says what is wrong, and starts nothing."""

from __future__ import annotations

import hivemind
import pytest

from ptune_search.config import load_config
from tests.search.search_process import TINY_CONFIG, assert_no_survivors


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
    search = run_search(overrides)
    assert search.wait(timeout=300) != 0
    assert message in search.log()
    assert not (tmp_path / "search").exists()
    assert not search.seen, f"a bad config started processes: {search.seen}"


def test_unreachable_initial_peers_fail_before_ray_starts(run_search, tmp_path, unreachable_peer):
    search = run_search(["swarm.mode=external", f"swarm.initial_peers=[{unreachable_peer}]"])
    assert search.wait(timeout=300) != 0
    assert "could not join the swarm" in search.log() and unreachable_peer in search.log()
    assert not (tmp_path / "search").exists()
    assert_no_survivors(search)


def test_resume_with_changed_settings_names_them_and_starts_nothing(run_search, tmp_path):
    output = tmp_path / "search"
    output.mkdir()
    started_with = load_config(TINY_CONFIG, [f"output_dir={output}"])
    (output / "config.yaml").write_text(started_with.to_yaml())
    search = run_search(["budget.max_steps=24", "seed=3", "mlflow.flush_timeout_s=5"], extra_args=["--resume"])
    assert search.wait(timeout=300) != 0
    log = search.log()
    assert f"--resume: the search in {output} started with other settings: " in log, log[-2000:]
    assert f"budget.max_steps ({started_with.budget.max_steps} when it started, 24 now)" in log
    assert f"seed ({started_with.seed} when it started, 3 now)" in log
    assert "flush_timeout_s" not in log  # where the work runs may change on resume
    assert "Traceback" not in log
    assert sorted(path.name for path in output.iterdir()) == ["config.yaml"]
    assert not search.seen, f"a refused resume started processes: {search.seen}"
