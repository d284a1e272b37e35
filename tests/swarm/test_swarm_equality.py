"""Blocks run by a swarm compute what local blocks compute: outputs and every gradient (fp32, 1e-5)."""

from __future__ import annotations

import time

import pytest
import torch
from swarm_testing import (
    HIDDEN,
    NUM_BLOCKS,
    chain_vs_local_blocks,
    classification_batch,
    copy_trainable,
    server_info,
    swarm_config,
)

from ptune_search.models.llama.model import DistributedLlamaForSequenceClassification, LlamaBlockSpan
from ptune_search.swarm.client.remote_chain import RemoteBlockChain
from ptune_search.swarm.server.settings import ServerSettings

TOLERANCE = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def run_step(model, batch, seed: int):
    """Loss, logits and grads of inputs_embeds, prompts and deep prompts for one training step."""
    torch.manual_seed(seed)
    embeds = model.model.embed_tokens(batch["input_ids"]).detach().requires_grad_(True)
    output = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    output.loss.backward()
    grads = {"inputs_embeds": embeds.grad, "prompts": model.model.prompt_embeddings.weight.grad}
    if model.model.tuning_mode == "deep_ptune":
        grads["deep_prompts"] = model.model.intermediate_prompt_embeddings.weight.grad
    return output.loss.detach(), output.logits.detach(), grads


@pytest.mark.parametrize("servers", [2, 3])
@pytest.mark.parametrize("tuning_mode", ["ptune", "deep_ptune"])
def test_training_step_through_swarm_equals_local_blocks(request, swarm_model, remote_classifier, servers, tuning_mode):
    swarm = request.getfixturevalue(f"swarm{servers}")
    settings = dict(num_labels=3, tuning_mode=tuning_mode, pre_seq_len=3)
    local = DistributedLlamaForSequenceClassification.from_pretrained(swarm_model, local_blocks=True, **settings)
    if tuning_mode == "deep_ptune":  # random deep prompts, not the zero init, so every block's rows matter
        torch.nn.init.normal_(local.model.intermediate_prompt_embeddings.weight, std=0.5)
    remote = remote_classifier(swarm, **settings)
    copy_trainable(local, remote)
    batch = classification_batch(seed=servers)
    connection = remote.model.layers.connection
    hits_before = [server_info(connection, server.peer_id)["cache"]["hits"] for server in swarm.servers]

    local_loss, local_logits, local_grads = run_step(local, batch, seed=0)
    remote_loss, remote_logits, remote_grads = run_step(remote, batch, seed=0)

    assert len(remote.model.layers.last_route) == servers
    hits = [server_info(connection, server.peer_id)["cache"]["hits"] for server in swarm.servers]
    assert all(after > before for after, before in zip(hits, hits_before)), (hits_before, hits)  # kept graphs used
    assert remote.model.layers.passes.stats["server_recomputes"] == 0
    assert max_diff(remote_logits, local_logits) <= TOLERANCE
    assert max_diff(remote_loss, local_loss) <= TOLERANCE
    for name, grad in local_grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        assert max_diff(remote_grads[name], grad) <= TOLERANCE, name


@pytest.mark.parametrize("stream_threshold", [2**20, 1024], ids=["unary", "streamed"])
def test_chain_with_per_example_deep_prompts_equals_local_blocks(swarm_model, swarm3, stream_threshold):
    """Deep prompts that differ per example travel whole; their grads come back per example."""
    config = swarm_config(swarm_model, swarm3, stream_threshold=stream_threshold)
    assert max(chain_vs_local_blocks(swarm_model, config, batch=3, seed=1)) <= TOLERANCE


def test_forward_without_grad_equals_local_blocks(swarm_model, swarm2):
    config = swarm_config(swarm_model, swarm2)
    local = LlamaBlockSpan.from_checkpoint(swarm_model, config, 0, NUM_BLOCKS)
    chain = RemoteBlockChain.connect(config)
    try:
        hidden = torch.randn(2, 7, HIDDEN)
        mask = torch.ones(2, 7, dtype=torch.long)
        with torch.no_grad():
            assert max_diff(chain(hidden, mask), local(hidden, mask)) <= TOLERANCE
    finally:
        chain.close()


def test_bfloat16_server_equals_local_bfloat16_blocks_for_a_float32_client(swarm_model, start_swarm):
    """The client's float32 hidden states travel as bfloat16; deep-prompt grads come back in float32."""
    swarm = start_swarm(1, settings=ServerSettings(dtype="bfloat16"))
    config = swarm_config(swarm_model, swarm)
    local = LlamaBlockSpan.from_checkpoint(swarm_model, config, 0, NUM_BLOCKS, dtype=torch.bfloat16)
    chain = RemoteBlockChain.connect(config)
    try:
        generator = torch.Generator().manual_seed(2)
        hidden = torch.randn(2, 6, HIDDEN, generator=generator)
        mask = torch.ones(2, 6, dtype=torch.long)
        weight = torch.randn(2 * NUM_BLOCKS, HIDDEN, generator=generator)
        grad_out = torch.randn(2, 6, HIDDEN, generator=generator)
        results = []
        for blocks, dtype in ((local, torch.bfloat16), (chain, torch.float32)):
            x, w = hidden.to(dtype).requires_grad_(True), weight.clone().requires_grad_(True)
            output = blocks(x, mask, w.unsqueeze(0).expand(2, -1, -1))
            output.backward(grad_out.to(dtype))
            results.append((output.detach().float(), x.grad.float(), w.grad))
        assert results[1][0].dtype == torch.float32
        for ours, reference in zip(results[1], results[0]):
            assert max_diff(ours, reference) <= 1e-2 * reference.abs().max().item()
    finally:
        chain.close()


def test_a_step_abandoned_after_its_forward_frees_its_graph_once_it_expires(start_swarm, remote_classifier):
    max_age = 3.0
    swarm = start_swarm(1, settings=ServerSettings(cache_max_age=max_age))
    model = remote_classifier(swarm, tuning_mode="deep_ptune", pre_seq_len=2)
    connection, peer_id = model.model.layers.connection, swarm.servers[0].peer_id
    before_forward = time.monotonic()
    model(**classification_batch(0))  # a training forward: the server keeps its graph for the backward
    while (cache := server_info(connection, peer_id)["cache"])["entries"]:  # no request comes in meanwhile
        assert time.monotonic() - before_forward < 40 * max_age, f"the abandoned graph is still kept: {cache}"
        time.sleep(0.2)
    freed_after = time.monotonic() - before_forward
    # one graph was kept and then evicted, by its age (nothing else came to take its place)
    assert cache["bytes"] == 0 and cache["evictions"] == 1, cache
    print(f"abandoned graph freed after {freed_after:.1f} s (max age {max_age} s, checked every {max_age / 4} s)")
    assert freed_after >= max_age  # kept for the backward until it expired, not dropped earlier
