"""Every family computes what transformers computes on the same weights (fp32, 1e-5).

Without prompts the classifier equals transformers' ``XForSequenceClassification``. With prompts the
reference is transformers' own model run layer by layer: the prompt prepended to the input embeddings, and
for ``deep_ptune`` each decoder layer's input shifted on the prefix positions by a forward pre-hook, the
hidden states pooled at the last real token and scored by the same head.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ptune_search.models.label_words import apply_label_word_head
from ptune_search.models.registry import AutoDistributedModelForSequenceClassification, UnsupportedModelError
from tests.models.tiny_families import make_tiny_checkpoint

VARIANTS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "falcon-new", "falcon-parallel", "bloom"]
TOLERANCE = 1e-5
NUM_LABELS, PAD = 3, 256
LENGTHS = [9, 4, 7]  # right padding: rows 1 and 2 are padded


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def checkpoint(variant: str) -> Path:
        if variant not in made:
            made[variant] = make_tiny_checkpoint(tmp_path_factory.mktemp(variant), variant)
        return made[variant]

    return checkpoint


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(LENGTHS), max(LENGTHS)), PAD)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        ids[row, :length] = torch.randint(0, 250, (length,), generator=generator)
        mask[row, :length] = 1
    labels = torch.randint(0, NUM_LABELS, (len(LENGTHS),), generator=generator)
    return ids, mask, labels


def hugging_face_classifier(path: Path):
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=NUM_LABELS, pad_token_id=PAD).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_without_prompts_logits_equal_hugging_face_classifier(checkpoints, variant):
    path = checkpoints(variant)
    reference = hugging_face_classifier(path)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        path, local_blocks=True, num_labels=NUM_LABELS
    )
    model.score.load_state_dict(reference.score.state_dict())
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        assert max_diff(model(ids, mask).logits, expected) <= TOLERANCE


def reference_logits(reference, prompts, deep_prompts, score_weight, ids, mask) -> torch.Tensor:
    """transformers' layers with the prompt prepended and deep prompts added to each layer's prefix input."""
    base = reference.base_model
    pre_seq_len = prompts.shape[0]
    layers = base.layers if hasattr(base, "layers") else base.h

    def add_deep_prompt(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rows = deep_prompts[index * pre_seq_len : (index + 1) * pre_seq_len]
            hidden = torch.cat([hidden[:, :pre_seq_len] + rows, hidden[:, pre_seq_len:]], dim=1)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        return hook

    hooks = (
        []
        if deep_prompts is None
        else [
            layer.register_forward_pre_hook(add_deep_prompt(index), with_kwargs=True)
            for index, layer in enumerate(layers)
        ]
    )
    try:
        embeds = base.get_input_embeddings()(ids)
        batch = ids.shape[0]
        embeds = torch.cat([prompts.expand(batch, -1, -1), embeds], dim=1)
        full_mask = torch.cat([torch.ones(batch, pre_seq_len, dtype=mask.dtype), mask], dim=1)
        hidden = base(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state[:, pre_seq_len:]
    finally:
        for hook in hooks:
            hook.remove()
    pooled = hidden[torch.arange(batch), mask.sum(dim=1) - 1]
    return F.linear(pooled, score_weight)


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_tuning_logits_and_grads_equal_a_layer_by_layer_reference(checkpoints, variant, mode):
    path = checkpoints(variant)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        path, local_blocks=True, num_labels=NUM_LABELS, tuning_mode=mode, pre_seq_len=3
    )
    prompt_names = {"model.prompt_embeddings.weight"} | (
        {"model.intermediate_prompt_embeddings.weight"} if mode == "deep_ptune" else set()
    )
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == prompt_names | {"score.weight"}
    with torch.no_grad():  # non-zero deep prompts, so a wrong layout or position cannot hide
        for name in prompt_names:
            trainable[name].normal_(generator=torch.Generator().manual_seed(len(name)))
    leaves = {name: p.detach().clone().requires_grad_(True) for name, p in trainable.items()}
    ids, mask, labels = padded_batch()

    output = model(ids, mask, labels=labels)
    output.loss.backward()
    reference = hugging_face_classifier(path)
    logits = reference_logits(
        reference,
        leaves["model.prompt_embeddings.weight"],
        leaves.get("model.intermediate_prompt_embeddings.weight"),
        leaves["score.weight"],
        ids,
        mask,
    )
    F.cross_entropy(logits, labels).backward()

    assert max_diff(output.logits, logits) <= TOLERANCE
    for name, parameter in trainable.items():
        assert leaves[name].grad.abs().sum() > 0, name
        assert max_diff(parameter.grad, leaves[name].grad) <= TOLERANCE, name


def test_an_unsupported_model_type_is_refused_naming_the_supported_ones(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*supported model types: bloom, falcon, llama, mistral"):
        AutoDistributedModelForSequenceClassification.from_pretrained(tmp_path, local_blocks=True)


def test_falcon_with_alibi_is_refused(checkpoints):
    path = checkpoints("falcon-parallel")
    with pytest.raises(ValueError, match="alibi=True"):
        AutoDistributedModelForSequenceClassification.from_pretrained(path, local_blocks=True, alibi=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_label_words_head_scores_what_the_causal_lm_gives_each_word_next(checkpoints, variant):
    """Tied (falcon, bloom) and untied (the rotary families) LM heads alike."""
    path = checkpoints(variant)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        path, local_blocks=True, num_labels=NUM_LABELS
    )
    words = [7, 42, 200]  # one token per class
    apply_label_word_head(model, words)
    causal_lm = AutoModelForCausalLM.from_pretrained(path).eval()
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        next_token = causal_lm(input_ids=ids, attention_mask=mask).logits[torch.arange(len(LENGTHS)), mask.sum(1) - 1]
        assert max_diff(model(ids, mask).logits, next_token[:, words]) <= TOLERANCE
