"""Inference sessions on block servers: generation over the swarm, caches reserved, freed and replayed."""

from __future__ import annotations

import time
from typing import Callable

import pytest
import torch
from swarm_testing import server_info

from ptune_search.models.llama.model import DistributedLlamaForCausalLM
from ptune_search.swarm.client.chain_passes import SwarmRequestError
from ptune_search.swarm.client.connection import SwarmConnection
from ptune_search.swarm.protocol import ErrorKind, RequestRefused
from ptune_search.swarm.server.settings import ServerSettings

PAD = 256


@pytest.fixture
def causal_lm(swarm_model):
    """``causal_lm(swarm=None, **settings)``: the tiny Llama's causal LM on a swarm (or local blocks), closed after."""
    models = []

    def build(swarm=None, **settings) -> DistributedLlamaForCausalLM:
        where = {"initial_peers": swarm.initial_peers} if swarm is not None else {"local_blocks": True}
        options = dict(request_timeout=10.0, block_wait_timeout=10.0) if swarm is not None else {}
        model = DistributedLlamaForCausalLM.from_pretrained(swarm_model, **where, **options, **settings)
        models.append(model)
        return model

    try:
        yield build
    finally:
        for model in models:
            model.close()


def with_prompts(model: DistributedLlamaForCausalLM, seed: int = 0) -> DistributedLlamaForCausalLM:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "prompt_embeddings" in name:
                parameter.normal_(std=1.0, generator=generator)
    return model


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second left-padded."""
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = PAD, 0
    return ids, mask


def sessions_of(connection: SwarmConnection, swarm) -> list[dict]:
    return [server_info(connection, server.peer_id)["sessions"] for server in swarm.servers if server.alive()]


def eventually(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_generation_over_the_swarm_equals_local_blocks(swarm2, causal_lm, mode):
    settings = dict(tuning_mode=mode, pre_seq_len=3, eos_token_id=None)
    local = with_prompts(causal_lm(None, **settings))
    remote = with_prompts(causal_lm(swarm2, **settings))
    ids, mask = batch()

    expected = local.generate(ids, attention_mask=mask, max_new_tokens=10)
    assert remote.generate(ids, attention_mask=mask, max_new_tokens=10).tolist() == expected.tolist()


def test_a_session_reserves_its_cache_until_closed(swarm2, causal_lm):
    model = causal_lm(swarm2, tuning_mode="deep_ptune", pre_seq_len=2)
    with SwarmConnection(swarm2.initial_peers) as observer:
        with model.inference_session(max_length=40, batch_size=2) as session:
            session.step(batch()[0])
            during = sessions_of(observer, swarm2)
            budgets = [server_info(observer, server.peer_id)["inflight"] for server in swarm2.servers]
        assert [s["open"] for s in during] == [1, 1]
        positions = 2 * (2 + 40)  # rows x (prefix + max_length)
        assert all(s["reserved_bytes"] > 0 and s["reserved_bytes"] % positions == 0 for s in during)
        assert all(s["allocated_bytes"] == s["reserved_bytes"] for s in during)  # the whole cache, and no more
        assert all(b["bytes"] >= s["reserved_bytes"] for b, s in zip(budgets, during))
        assert eventually(
            lambda: all(s["open"] == 0 and s["reserved_bytes"] == 0 for s in sessions_of(observer, swarm2))
        )
        assert all(s["ended"].get("closed", 0) >= 1 for s in sessions_of(observer, swarm2))  # not "disconnected"


def test_a_session_is_freed_when_its_client_disconnects(swarm2, causal_lm):
    model = causal_lm(swarm2)
    with SwarmConnection(swarm2.initial_peers) as observer:
        session = model.inference_session(max_length=20)
        session.step(batch()[0][:1])
        assert [s["open"] for s in sessions_of(observer, swarm2)] == [1, 1]
        model.close()  # the client's p2p daemon goes away with the session open
        assert eventually(lambda: all(s["open"] == 0 for s in sessions_of(observer, swarm2)))
        assert all(s["ended"].get("disconnected", 0) >= 1 for s in sessions_of(observer, swarm2))


def test_a_session_expires_after_its_timeout_without_steps(swarm2, causal_lm):
    model = causal_lm(swarm2, session_timeout=1.0)
    with SwarmConnection(swarm2.initial_peers) as observer:
        with model.inference_session(max_length=20) as session:
            session.step(batch()[0][:1])
            assert eventually(lambda: all(s["open"] == 0 for s in sessions_of(observer, swarm2)), timeout=10)
            assert all(s["ended"].get("expired", 0) >= 1 for s in sessions_of(observer, swarm2))
            with pytest.raises(RequestRefused, match="expired"):
                session.step(torch.tensor([[5]]))


def test_a_full_server_refuses_a_session_as_busy(start_swarm, causal_lm):
    # 6 blocks x (keys + values) x 2 heads x 16 dims x 4 bytes = 1536 bytes a position: 300 positions ~ 450 KiB
    swarm = start_swarm(1, settings=ServerSettings(inflight_bytes=700 * 1024))
    model = causal_lm(swarm, busy_timeout=1.0, backoff_base=0.1)
    prompt = batch()[0][:1]
    with model.inference_session(max_length=300) as first:
        first.step(prompt)
        with pytest.raises(SwarmRequestError, match="busy"):
            with model.inference_session(max_length=300) as second:
                second.step(prompt)
    with model.inference_session(max_length=300) as third:  # the first one's memory is back
        third.step(prompt)


def test_a_server_killed_mid_generation_changes_no_token(start_swarm, causal_lm):
    swarm = start_swarm(4, replicas=2)
    settings = dict(tuning_mode="deep_ptune", pre_seq_len=2, eos_token_id=None)
    ids = batch(seed=1)[0][:1]
    expected = with_prompts(causal_lm(None, **settings)).generate(ids, max_new_tokens=12)[0, ids.shape[1] :]
    model = with_prompts(causal_lm(swarm, **settings))

    tokens = []
    with model.inference_session(max_length=ids.shape[1] + 12) as session:
        logits = session.step(ids)[:, -1]
        for index in range(12):
            tokens.append(int(logits.argmax(dim=-1)))
            if index == 5:
                peer_id, _, _ = session.blocks.route[-1]
                swarm.kill_server(swarm.server_by_peer(peer_id))
            logits = session.step(torch.tensor([[tokens[-1]]]))[:, -1]
        assert session.blocks.replays >= 1
    assert tokens == expected.tolist()


def test_bad_sessions_are_refused_and_leave_the_server_serving(swarm2, causal_lm):
    model = causal_lm(swarm2, tuning_mode="deep_ptune", pre_seq_len=2, eos_token_id=None)
    with pytest.raises(RequestRefused, match="token limit") as refusal:
        with model.inference_session(max_length=600) as session:  # beyond the servers' 512 tokens
            session.step(batch()[0][:1])
    assert refusal.value.kind == ErrorKind.BAD_REQUEST
    blocks = model.model.layers.inference_session(batch_size=1, max_length=10, pre_seq_len=2)
    with pytest.raises(RequestRefused, match="deep prompts"), blocks:
        blocks.step(torch.zeros(1, 3, 64), torch.ones(1, 3, dtype=torch.long))  # the prefix without its prompts
    ids = batch()[0][:1]
    assert model.generate(ids, max_new_tokens=3).shape == (1, ids.shape[1] + 3)
    with SwarmConnection(swarm2.initial_peers) as observer:
        assert eventually(lambda: all(s["open"] == 0 for s in sessions_of(observer, swarm2)))
