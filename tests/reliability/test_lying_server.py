"""A server that answers every request with a lie (see lying_server.LIES) is that server's failure.

Alone, it makes a pass fail with an error naming it. Next to an honest replica, every lie is caught by the
client's checks (count, shape, dtype, finite values, chunk counts, buffers) or, for a ``bad_request`` refusal
of a good request, by the replica answering it; the liar is banned and the hop retried on the replica: the
trial's losses equal local blocks'.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator

import pytest
import torch

from ptune_search.models.llama.model import DistributedLlamaForSequenceClassification
from ptune_search.swarm.client.chain_passes import SwarmRequestError
from ptune_search.tiny_llama import make_tiny_llama
from tests.reliability.lying_server import LIES, LyingSwarm
from tests.swarm.swarm_testing import classification_batch, copy_trainable, living

PREFIX = "tiny-liar"
NUM_BLOCKS = 4
MAX_STEPS = 80  # steps trained until every lie was told at least once, and a lie to a backward
CLIENT = dict(
    num_labels=3,
    tuning_mode="deep_ptune",
    pre_seq_len=2,
    stream_threshold=1,  # every request streams, so framing lies reach the client
    ban_timeout=0.05,  # the liar is tried again soon, so it tells all its lies
    request_timeout=30.0,
)


@pytest.fixture(scope="module")
def liar_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / PREFIX, hidden_size=64, num_layers=NUM_BLOCKS)


@pytest.fixture(scope="module")
def swarm(liar_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LyingSwarm]:
    """A bootstrap peer and a server of every block that lies; tests may add honest servers."""
    swarm = LyingSwarm(liar_model, 0, log_dir=tmp_path_factory.mktemp("liar"))
    try:
        swarm.start(timeout=180)
        swarm.start_server(0, NUM_BLOCKS, extra_args=["--lie"])
        swarm.wait_until_online(1, timeout=180)
        yield swarm
    finally:
        groups = {child.pid for child in [swarm.bootstrap, *swarm.servers] if child is not None}
        swarm.stop()
        assert not living(lambda p: p[2] in groups), "a process of the lying swarm survived it"


def lies_told(swarm: LyingSwarm) -> list[tuple[str, str]]:
    """(lie, forward or backward) of every lie the liar told so far."""
    return re.findall(r"telling lie (\w+) to a (\w+)", swarm.servers[0].log_path.read_text(errors="replace"))


def every_lie_told(told: list[tuple[str, str]]) -> bool:
    return {lie for lie, _ in told} == set(LIES) and {kind for _, kind in told} == {"forward", "backward"}


@pytest.mark.slow
def test_a_lying_server_without_replica_fails_the_pass_with_an_error_naming_it(liar_model, swarm):
    remote = DistributedLlamaForSequenceClassification.from_pretrained(
        liar_model, initial_peers=swarm.initial_peers, max_retries=2, block_wait_timeout=1.0, **CLIENT
    )
    try:
        with pytest.raises(SwarmRequestError) as failure:
            for _ in range(3):  # its forwards alternate truths and lies: the lies fail a pass within 3 steps
                remote(**classification_batch(0, vocab=remote.config.vocab_size)).loss.backward()
    finally:
        remote.close()
    assert swarm.servers[0].peer_id in str(failure.value)
    print(f"error: {failure.value}")


@pytest.mark.slow
def test_every_lie_is_caught_and_training_with_an_honest_replica_equals_local_blocks(liar_model, swarm, caplog):
    swarm.start_server(0, NUM_BLOCKS)
    swarm.wait_until_online(2, timeout=180)
    local = DistributedLlamaForSequenceClassification.from_pretrained(liar_model, local_blocks=True, **CLIENT)
    torch.nn.init.normal_(local.model.intermediate_prompt_embeddings.weight, std=0.5)
    remote = DistributedLlamaForSequenceClassification.from_pretrained(
        liar_model, initial_peers=swarm.initial_peers, **CLIENT
    )
    copy_trainable(local, remote)
    batches = [classification_batch(seed, vocab=local.config.vocab_size) for seed in range(4)]
    caplog.set_level(logging.INFO, logger="ptune_search.swarm")
    told_before = len(lies_told(swarm))
    losses: dict[str, list[float]] = {"remote": [], "local": []}
    optimizers = {
        name: torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for name, model in (("remote", remote), ("local", local))
    }
    try:
        while not every_lie_told(lies_told(swarm)[told_before:]) and len(losses["remote"]) < MAX_STEPS:
            for name, model in (("remote", remote), ("local", local)):
                output = model(**batches[len(losses[name]) % len(batches)])
                output.loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad()
                losses[name].append(output.loss.item())
        stats = remote.model.layers.passes.stats
    finally:
        remote.close()

    told = lies_told(swarm)[told_before:]
    assert every_lie_told(told), f"not every lie was told, to forwards and backwards, in {MAX_STEPS} steps: {told}"
    banned = {match for r in caplog.records for match in re.findall(r"banning server (\w+)", r.getMessage())}
    assert banned == {swarm.servers[0].peer_id}, f"banned: {banned}"
    assert stats["failed_calls"] == len(told) and stats["rerouted_backward_hops"] >= 1, (stats, told)
    assert stats["false_refusals"] == sum(lie == "bad_request" for lie, _ in told) >= 1, (stats, told)
    print(f"{len(losses['remote'])} steps, {len(told)} lies caught, stats {stats}")
    assert max(abs(a - b) for a, b in zip(losses["remote"], losses["local"])) <= 1e-5, losses
