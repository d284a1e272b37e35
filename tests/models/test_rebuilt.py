"""``rebuilt``: a model under other prompt settings on the same block chain and frozen weights, equal to a
fresh ``from_pretrained`` under the same seed (what a reused search trial actor relies on)."""

from __future__ import annotations

import pytest
import torch

from ptune_search.models.registry import AutoDistributedModelForSequenceClassification


def _fresh(path, seed: int = 0, **settings):
    torch.manual_seed(seed)
    return AutoDistributedModelForSequenceClassification.from_pretrained(
        path, local_blocks=True, num_labels=5, **settings
    )


@pytest.mark.parametrize(
    "first, then",
    [
        ({"tuning_mode": "deep_ptune", "pre_seq_len": 3}, {"tuning_mode": "ptune", "pre_seq_len": 7}),
        ({"tuning_mode": "ptune", "pre_seq_len": 2}, {"tuning_mode": "deep_ptune", "pre_seq_len": 5}),
        ({"tuning_mode": "ptune", "pre_seq_len": 4}, {"tuning_mode": None, "pre_seq_len": 0}),
    ],
)
def test_a_rebuilt_model_equals_a_fresh_one_and_shares_blocks_and_frozen_weights(tiny_model_path, first, then):
    model = _fresh(tiny_model_path, seed=1, **first)
    torch.manual_seed(0)
    rebuilt = model.rebuilt(**then)
    fresh = _fresh(tiny_model_path, seed=0, **then)

    assert rebuilt.model.layers is model.model.layers, "the block chain is kept, not loaded again"
    assert rebuilt.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (rebuilt.model.tuning_mode, rebuilt.model.pre_seq_len) == (then["tuning_mode"], then["pre_seq_len"])
    fresh_state = fresh.state_dict()
    assert set(rebuilt.state_dict()) == set(fresh_state)
    for name, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, fresh_state[name]), name
    trainable = {name for name, p in rebuilt.named_parameters() if p.requires_grad}
    assert trainable == {name for name, p in fresh.named_parameters() if p.requires_grad}


def test_rebuilt_refuses_to_change_the_block_chains_settings(tiny_model_path):
    model = _fresh(tiny_model_path, tuning_mode="ptune", pre_seq_len=2)
    with pytest.raises(ValueError, match=r"cannot change its settings \['request_timeout'\]"):
        model.rebuilt(tuning_mode="ptune", pre_seq_len=4, request_timeout=3.0)
