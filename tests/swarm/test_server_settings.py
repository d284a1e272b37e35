"""Server settings are declared once (ServerSettings); the flags of `swarm serve` and `swarm local` follow them."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import psutil
import pytest

from ptune_search.swarm.__main__ import add_swarm_arguments
from ptune_search.swarm.launcher import LocalSwarm
from ptune_search.swarm.protocol import RequestLimits
from ptune_search.swarm.server.fair_queue import MergeLimits
from ptune_search.swarm.server.settings import ListenAddress, ServerSettings
from ptune_search.swarm.setting_flags import setting, setting_flags, settings_from_flags

SERVE = ["serve", "--model", "m", "--blocks", "0:2", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmPeer"]
LOCAL = ["local", "--model", "m", "--servers", "2", "--peers-file", "peers.txt"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_swarm_arguments(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_serve_without_setting_flags_runs_with_the_declared_defaults():
    assert settings_from_flags(ServerSettings(), parse(SERVE)) == ServerSettings()


def test_serve_flags_keep_the_names_users_know():
    args = parse(
        [
            *SERVE,
            *("--record-ttl", "4", "--refresh-period", "1", "--max-tokens", "512", "--receive-timeout", "5"),
            *("--max-inflight-bytes", "1000", "--max-inflight-tokens", "64", "--cache-bytes", "2000"),
            *("--cache-max-age", "3", "--merge-max-tokens", "0", "--merge-wait", "0.3", "--dtype", "bfloat16"),
            *("--host", "10.0.0.2", "--port", "4100", "--compute-lock", "/tmp/cores", "--num-threads", "2"),
        ]
    )
    assert settings_from_flags(ServerSettings(), args) == ServerSettings(
        dtype="bfloat16",
        num_threads=2,
        limits=RequestLimits(max_tokens=512, receive_timeout=5.0),
        cache_bytes=2000,
        cache_max_age=3.0,
        inflight_bytes=1000,
        inflight_tokens=64,
        merge=MergeLimits(max_tokens=0, max_wait=0.3),
        record_ttl=4.0,
        refresh_period=1.0,
        listen=ListenAddress("10.0.0.2", 4100),
        compute_lock=Path("/tmp/cores"),
    )


def test_settings_written_as_flags_read_back_equal():
    settings = ServerSettings(
        dht_prefix="model-a",
        limits=RequestLimits(max_payload_bytes=3 * 1024**2, max_queue=7),
        merge=MergeLimits(max_bytes=10**6),
        refresh_period=0.5,
        identity_file=Path("/keys/server-1"),
    )
    assert settings_from_flags(ServerSettings(), parse([*SERVE, *setting_flags(settings)])) == settings


def test_only_settings_that_differ_from_the_defaults_become_flags():
    assert setting_flags(ServerSettings()) == []
    assert setting_flags(ServerSettings(record_ttl=3.0)) == ["--record-ttl", "3.0"]


def test_local_takes_every_setting_but_those_it_chooses_for_each_server(capsys):
    args = parse([*LOCAL, "--record-ttl", "3", "--max-tokens", "256", "--merge-wait", "0"])
    expected = ServerSettings(limits=RequestLimits(max_tokens=256), merge=MergeLimits(max_wait=0.0), record_ttl=3.0)
    assert settings_from_flags(ServerSettings(), args) == expected
    for flag, value in (("--port", "4100"), ("--compute-lock", "x"), ("--identity-file", "key")):
        with pytest.raises(SystemExit):
            parse([*LOCAL, flag, value])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_a_local_swarm_refuses_settings_it_chooses_for_each_server():
    with pytest.raises(ValueError, match="chooses listen for each server"):
        LocalSwarm("/nowhere", 1, settings=ServerSettings(listen=ListenAddress(port=4100)))


def test_help_shows_each_declared_default(capsys):
    with pytest.raises(SystemExit):
        parse(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "seconds a server's DHT records live (default: 60.0)" in shown
    assert (
        "--merge-wait MERGE_WAIT seconds a batch may wait for other active clients' requests (default: 0.02)" in shown
    )


def test_a_dtype_other_than_float32_or_bfloat16_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        ServerSettings(dtype="float16")


def test_a_setting_without_help_cannot_become_a_flag():
    @dataclasses.dataclass(frozen=True)
    class Bare:
        documented: int = setting(1, help="has a flag")
        bare: int = 2

    with pytest.raises(TypeError, match="Bare.bare is not declared with setting"):
        setting_flags(Bare())


def test_graph_memory_defaults_to_a_quarter_of_the_machine_and_given_values_win():
    memory = psutil.virtual_memory().total
    defaults = ServerSettings()
    assert defaults.graph_cache_bytes == pytest.approx(memory / 4, rel=1e-3)
    assert defaults.inflight_budget_bytes == defaults.graph_cache_bytes + 2 * 1024**3
    given = ServerSettings(cache_bytes=2000, inflight_bytes=1000)
    assert (given.graph_cache_bytes, given.inflight_budget_bytes) == (2000, 1000)
    assert ServerSettings(cache_bytes=2000).inflight_budget_bytes == 2000 + 2 * 1024**3
