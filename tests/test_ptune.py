from __future__ import annotations

import pytest
import torch

from ptune_search import PTuneConfig, PTuneMixin
from ptune_search.models import DistributedLlamaForCausalLM, DistributedLlamaForSequenceClassification

HIDDEN, LAYERS = 64, 4


def classifier(path, tuning_mode, pre_seq_len, **kwargs):
    return DistributedLlamaForSequenceClassification.from_pretrained(
        path, local_blocks=True, num_labels=5, tuning_mode=tuning_mode, pre_seq_len=pre_seq_len, **kwargs
    )


def test_ptune_config_defaults_mean_no_tuning():
    assert PTuneConfig() == PTuneConfig(pre_seq_len=0, tuning_mode=None)
    assert PTuneMixin._keys_to_ignore_on_load_missing == [r"(intermediate_)?prompt_embeddings\.weight$"]


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_parameter_and_get_prompt_shapes(tiny_model_path, mode):
    model = classifier(tiny_model_path, mode, 6)
    assert model.model.prompt_embeddings.weight.shape == (6, HIDDEN)
    prompts, intermediate = model.get_prompt(batch_size=3)
    assert prompts.shape == (3, 6, HIDDEN)
    if mode == "deep_ptune":
        assert model.model.intermediate_prompt_embeddings.weight.shape == (6 * LAYERS, HIDDEN)
        assert intermediate.shape == (3, 6 * LAYERS, HIDDEN)
    else:
        assert not hasattr(model.model, "intermediate_prompt_embeddings")
        assert intermediate is None


def test_get_prompt_without_tuning_is_none(tiny_model_path):
    model = classifier(tiny_model_path, None, 0)
    assert model.get_prompt(batch_size=2) == (None, None)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["score.weight"]


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompts_stay_float32_in_a_bfloat16_model(tiny_model_path, mode):
    model = classifier(tiny_model_path, mode, 4, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.get_prompt(2) if p is not None)
    logits = model(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "mode, pre_seq_len, message",
    [
        ("prefix", 4, "tuning_mode must be one of"),
        ("ptune", 0, "pre_seq_len must be a positive int"),
        ("deep_ptune", -3, "pre_seq_len must be a positive int"),
    ],
)
def test_bad_settings_are_clear_errors(tiny_model_path, mode, pre_seq_len, message):
    with pytest.raises(ValueError, match=message):
        classifier(tiny_model_path, mode, pre_seq_len)


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_only_prompts_and_head_require_grad(tiny_model_path, mode):
    model = classifier(tiny_model_path, mode, 4)
    expected = {"model.prompt_embeddings.weight", "score.weight"}
    if mode == "deep_ptune":
        expected.add("model.intermediate_prompt_embeddings.weight")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_causal_lm_trains_only_prompts(tiny_model_path):
    model = DistributedLlamaForCausalLM.from_pretrained(
        tiny_model_path, local_blocks=True, tuning_mode="deep_ptune", pre_seq_len=2
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.prompt_embeddings.weight", "model.intermediate_prompt_embeddings.weight"}


def test_block_placement_must_be_chosen(tiny_model_path):
    with pytest.raises(ValueError, match="local_blocks=True .* initial_peers"):
        DistributedLlamaForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match="not both"):
        DistributedLlamaForCausalLM.from_pretrained(
            tiny_model_path, local_blocks=True, initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmX"]
        )
