"""Other families through a real 2-server swarm on loopback: Qwen3 (rotary, q/k norms), Mixtral (sparse
experts) and Bloom (ALiBi) train exactly as with local blocks, and servers and clients of different models
refuse each other with a message naming both."""

from __future__ import annotations

import pytest
import torch
from swarm_testing import SwarmRegistry, classification_batch, copy_trainable

from ptune_search.models.registry import AutoDistributedModelForSequenceClassification
from ptune_search.swarm.client.routing import ModelMismatchError
from tests.models.tiny_families import make_tiny_checkpoint

TOLERANCE = 1e-5
SETTINGS = dict(num_labels=3, tuning_mode="deep_ptune", pre_seq_len=2, pad_token_id=256)
CLIENT = dict(request_timeout=30.0, block_wait_timeout=30.0)


@pytest.fixture(scope="module", params=["qwen3", "mixtral", "bloom"])
def family_swarm(request, tmp_path_factory):
    """``(variant, checkpoint, swarm)``: two servers (blocks 0:2 and 2:4) of a tiny checkpoint of the family."""
    variant = request.param
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("models") / f"tiny-{variant}", variant)
    registry = SwarmRegistry()
    try:
        yield variant, path, registry.start(path, 2, log_dir=tmp_path_factory.mktemp(f"swarm-{variant}"))
    finally:
        registry.stop_all()


def test_training_step_through_the_swarm_equals_local_blocks(family_swarm):
    variant, path, swarm = family_swarm
    local = AutoDistributedModelForSequenceClassification.from_pretrained(path, local_blocks=True, **SETTINGS)
    torch.nn.init.normal_(local.model.intermediate_prompt_embeddings.weight, std=0.5)
    remote = AutoDistributedModelForSequenceClassification.from_pretrained(
        path, initial_peers=swarm.initial_peers, **SETTINGS, **CLIENT
    )
    try:
        copy_trainable(local, remote)
        batch = classification_batch(seed=1)
        outputs = [model(**batch) for model in (local, remote)]
        for output in outputs:
            output.loss.backward()
        assert len(remote.model.layers.last_route) == 2
        assert (outputs[0].logits - outputs[1].logits).abs().max() <= TOLERANCE
        for name, parameter in local.named_parameters():
            if parameter.requires_grad:
                assert parameter.grad.abs().max() > 0, name
                assert (remote.get_parameter(name).grad - parameter.grad).abs().max() <= TOLERANCE, name
    finally:
        remote.close()


@pytest.mark.parametrize("other", ["another family", "another checkpoint of the family"])
def test_a_client_of_another_model_is_refused_naming_both(family_swarm, tmp_path, other):
    variant, path, swarm = family_swarm
    other_variant = ("llama" if variant != "llama" else "qwen3") if other == "another family" else variant
    other_path = make_tiny_checkpoint(tmp_path / "other", other_variant, seed=1)
    client = AutoDistributedModelForSequenceClassification.from_pretrained(
        other_path, initial_peers=swarm.initial_peers, dht_prefix=path.name, **SETTINGS, **CLIENT
    )
    try:
        with pytest.raises(ModelMismatchError) as refused:
            client(**classification_batch(seed=2))
    finally:
        client.close()
    message = str(refused.value)
    assert f"a {variant} model" in message and f"this client loaded a {other_variant} model" in message
    assert "fingerprint" in message and path.name in message
