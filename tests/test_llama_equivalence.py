"""The distributed classes compute what Hugging Face's Llama computes on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification

from ptune_search.models import DistributedLlamaForCausalLM, DistributedLlamaForSequenceClassification

TOLERANCE = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def token_batch(batch: int = 3, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def distributed_lm(path, mode=None, pre_seq_len=0):
    model = DistributedLlamaForCausalLM.from_pretrained(
        path, local_blocks=True, tuning_mode=mode, pre_seq_len=pre_seq_len
    )
    with torch.no_grad():  # non-zero deep prompts, so a wrong layout or position cannot hide
        for prompt in model.get_prompt(1):
            if prompt is not None:
                prompt.copy_(torch.randn(prompt.shape, generator=torch.Generator().manual_seed(1)))
    return model


def test_causal_lm_without_prompts_equals_hugging_face(tiny_model_path):
    reference = LlamaForCausalLM.from_pretrained(tiny_model_path)
    model = distributed_lm(tiny_model_path)
    ids = token_batch()
    assert max_diff(model(ids).logits, reference(ids).logits) <= TOLERANCE


def test_classifier_without_prompts_equals_hugging_face(tiny_model_path):
    config = AutoConfig.from_pretrained(tiny_model_path)
    config.num_labels = 5
    reference = LlamaForSequenceClassification.from_pretrained(tiny_model_path, config=config)
    model = DistributedLlamaForSequenceClassification.from_pretrained(tiny_model_path, config=config, local_blocks=True)
    model.score.load_state_dict(reference.score.state_dict())
    ids = token_batch()
    assert max_diff(model(ids).logits, reference(ids).logits) <= TOLERANCE


def test_ptune_equals_hugging_face_on_prepended_prompt(tiny_model_path):
    reference = LlamaForCausalLM.from_pretrained(tiny_model_path)
    model = distributed_lm(tiny_model_path, "ptune", 5)
    ids = token_batch()
    prompts, _ = model.get_prompt(ids.shape[0])
    embeds = torch.cat([prompts, reference.model.embed_tokens(ids)], dim=1)
    expected = reference(inputs_embeds=embeds).logits[:, 5:]
    assert max_diff(model(ids).logits, expected) <= TOLERANCE


def deep_ptune_reference(reference: LlamaForCausalLM, ids, prompts, intermediate, pre_seq_len):
    """Loop over Hugging Face's decoder layers, adding each layer's prompt rows to the first positions."""
    base = reference.model
    hidden = torch.cat([prompts, base.embed_tokens(ids)], dim=1)
    length = hidden.shape[1]
    position_ids = torch.arange(length).unsqueeze(0)
    position_embeddings = base.rotary_emb(hidden, position_ids)
    causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    for layer_index, layer in enumerate(base.layers):
        rows = intermediate[:, layer_index * pre_seq_len : (layer_index + 1) * pre_seq_len]
        hidden = torch.cat([hidden[:, :pre_seq_len] + rows, hidden[:, pre_seq_len:]], dim=1)
        hidden = layer(
            hidden, attention_mask=causal, position_ids=position_ids, position_embeddings=position_embeddings
        )
    return reference.lm_head(base.norm(hidden))[:, pre_seq_len:]


def test_deep_ptune_outputs_and_prompt_grads_equal_a_layer_loop_reference(tiny_model_path):
    pre_seq_len = 3
    reference = LlamaForCausalLM.from_pretrained(tiny_model_path, attn_implementation="eager")
    model = distributed_lm(tiny_model_path, "deep_ptune", pre_seq_len)
    ids = token_batch()
    weights = torch.randn(
        ids.shape[0], ids.shape[1], reference.config.vocab_size, generator=torch.Generator().manual_seed(2)
    )

    logits = model(ids).logits
    (logits * weights).sum().backward()
    prompt_grad = model.model.prompt_embeddings.weight.grad
    intermediate_grad = model.model.intermediate_prompt_embeddings.weight.grad

    prompt_leaf = model.model.prompt_embeddings.weight.detach().clone().requires_grad_(True)
    intermediate_leaf = model.model.intermediate_prompt_embeddings.weight.detach().clone().requires_grad_(True)
    batch = ids.shape[0]
    expected = deep_ptune_reference(
        reference, ids, prompt_leaf.expand(batch, -1, -1), intermediate_leaf.expand(batch, -1, -1), pre_seq_len
    )
    (expected * weights).sum().backward()

    assert max_diff(logits, expected) <= TOLERANCE
    assert intermediate_grad.abs().sum() > 0 and prompt_grad.abs().sum() > 0
    assert max_diff(prompt_grad, prompt_leaf.grad) <= TOLERANCE
    assert max_diff(intermediate_grad, intermediate_leaf.grad) <= TOLERANCE


@pytest.mark.parametrize("mode", [None, "ptune", "deep_ptune"])
def test_right_padded_batch_equals_each_sequence_alone(tiny_model_path, mode):
    model = DistributedLlamaForSequenceClassification.from_pretrained(
        tiny_model_path, local_blocks=True, num_labels=4, tuning_mode=mode, pre_seq_len=4 if mode else 0
    )
    config = model.config
    lengths = [9, 4, 6]
    sequences = [token_batch(1, n, seed=n)[0] for n in lengths]
    ids = torch.full((3, max(lengths)), config.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    batched = model(ids, attention_mask=mask).logits
    for row, sequence in enumerate(sequences):
        alone = model(sequence.unsqueeze(0)).logits[0]
        assert max_diff(batched[row], alone) <= TOLERANCE


def padded(sequences: list[torch.Tensor], pad_token_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequences`` as one batch padded on ``side``, with its attention mask."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), pad_token_id)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        where = slice(0, len(sequence)) if side == "right" else slice(length - len(sequence), length)
        ids[row, where] = sequence
        mask[row, where] = 1
    return ids, mask


@pytest.mark.parametrize("mode", [None, "ptune", "deep_ptune"])
def test_left_padded_batch_equals_right_padded_batch(tiny_model_path, mode):
    config = AutoConfig.from_pretrained(tiny_model_path)
    config.num_labels = 4
    classifier = DistributedLlamaForSequenceClassification.from_pretrained(
        tiny_model_path, config=config, local_blocks=True, tuning_mode=mode, pre_seq_len=4 if mode else 0
    )
    language_model = distributed_lm(tiny_model_path, mode, 4 if mode else 0)
    sequences = [token_batch(1, n, seed=n)[0] for n in (9, 4, 6)]
    right_ids, right_mask = padded(sequences, config.pad_token_id, "right")
    left_ids, left_mask = padded(sequences, config.pad_token_id, "left")

    right = classifier(right_ids, attention_mask=right_mask).logits
    left = classifier(left_ids, attention_mask=left_mask).logits
    assert max_diff(left, right) <= TOLERANCE
    assert max_diff(left, classifier(sequences[1].unsqueeze(0)).logits[0]) > 0  # rows differ: pooling matters

    right_tokens = language_model(right_ids, attention_mask=right_mask).logits[right_mask.bool()]
    left_tokens = language_model(left_ids, attention_mask=left_mask).logits[left_mask.bool()]
    assert max_diff(left_tokens, right_tokens) <= TOLERANCE


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        ([[1, 1, 1], [0, 0, 0]], r"attention_mask rows \[1\] are all zeros"),
        ([[1, 0, 1], [1, 1, 0]], r"attention_mask rows \[0\] have padding between tokens"),
        ([[1, 2, 1], [1, 1, 1]], "attention_mask may hold only 0"),
        ([[1, 1], [1, 1]], r"attention_mask has shape \(2, 2\), the inputs \(2, 3\)"),
    ],
)
def test_an_unusable_attention_mask_is_refused(tiny_model_path, mask, message):
    model = DistributedLlamaForSequenceClassification.from_pretrained(
        tiny_model_path, local_blocks=True, num_labels=2, tuning_mode="ptune", pre_seq_len=2
    )
    with pytest.raises(ValueError, match=message):
        model(token_batch(2, 3), attention_mask=torch.tensor(mask))
