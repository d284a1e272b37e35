"""generate() of every family's causal LM equals Hugging Face's, token for token, on the same weights.

With a ``ptune`` prompt the reference is Hugging Face's ``generate`` fed the prompt as leading input
embeddings; ``deep_ptune`` has no Hugging Face counterpart, so its reference is the same model over local
blocks recomputing the whole sequence for each token (no cache). Left-padded rows equal the rows alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ptune_search.models.registry import AutoDistributedModelForCausalLM
from tests.models.tiny_families import make_tiny_checkpoint

VARIANTS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "falcon-new", "falcon-parallel", "bloom"]
PAD, EOS = 256, 257
NEW_TOKENS = 8
LENGTHS = [7, 3]  # the second row is left-padded


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def checkpoint(variant: str) -> Path:
        if variant not in made:
            made[variant] = make_tiny_checkpoint(tmp_path_factory.mktemp(variant), variant)
        return made[variant]

    return checkpoint


def rows(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (length,), generator=generator) for length in LENGTHS]


def left_padded(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = sequence
        mask[row, width - len(sequence) :] = 1
    return ids, mask


def hugging_face_tokens(path: Path, sequence: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
    """New tokens of Hugging Face's greedy generate for one row, the prompt as leading input embeddings."""
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    embeds = reference.get_input_embeddings()(sequence[None])
    if prompts is not None:
        embeds = torch.cat([prompts[None], embeds], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    with torch.no_grad():
        out = reference.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD
        )
    return out[0]


def padded_new_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Hugging Face's new tokens of one row as they stand in a batch that goes on after the row stopped."""
    return torch.cat([tokens, torch.full((NEW_TOKENS - len(tokens),), PAD)])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", [None, "ptune"])
def test_greedy_generation_equals_hugging_face_with_the_prompt_as_input_embeddings(checkpoints, variant, mode):
    path = checkpoints(variant)
    settings = {"tuning_mode": mode, "pre_seq_len": 3} if mode else {}
    model = AutoDistributedModelForCausalLM.from_pretrained(path, local_blocks=True, **settings)
    prompts = None
    if mode:
        with torch.no_grad():  # a prompt that matters: wide values
            model.model.prompt_embeddings.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(1))
        prompts = model.model.prompt_embeddings.weight.detach()
    sequences = rows()
    ids, mask = left_padded(sequences)

    generated = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)

    assert torch.equal(generated[:, : ids.shape[1]], ids)
    new = generated[:, ids.shape[1] :]
    for row, sequence in enumerate(sequences):
        expected = hugging_face_tokens(path, sequence, prompts)
        assert new[row, : len(expected)].tolist() == expected.tolist(), f"row {row}"
        if len(expected) < new.shape[1]:  # the row met eos: the batch pads it
            assert expected[-1] == EOS and set(new[row, len(expected) :].tolist()) == {PAD}


def recomputed_greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding that runs the whole sequence through the model for every token (no cache)."""
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_deep_ptune_generation_equals_recomputing_the_whole_sequence(checkpoints, variant):
    path = checkpoints(variant)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, local_blocks=True, tuning_mode="deep_ptune", pre_seq_len=3, eos_token_id=None
    )
    with torch.no_grad():
        for embedding in (model.model.prompt_embeddings, model.model.intermediate_prompt_embeddings):
            embedding.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(2))
    ids = rows(seed=3)[0][None]

    generated = model.generate(ids, max_new_tokens=NEW_TOKENS)

    assert generated.tolist() == recomputed_greedy(model, ids, NEW_TOKENS).tolist()


def test_session_steps_give_the_logits_of_a_full_forward(checkpoints):
    path = checkpoints("llama")
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, local_blocks=True, tuning_mode="deep_ptune", pre_seq_len=2
    )
    with torch.no_grad():
        model.model.intermediate_prompt_embeddings.weight.normal_(generator=torch.Generator().manual_seed(4))
    ids = rows(seed=5)[0][None]
    with torch.no_grad():
        expected = model(ids).logits
    with model.inference_session(max_length=ids.shape[1]) as session:
        logits = torch.cat([session.step(ids[:, :4]), session.step(ids[:, 4:5]), session.step(ids[:, 5:])], dim=1)
    assert (logits - expected).abs().max().item() <= 1e-5


def test_generate_continues_an_open_session(checkpoints):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        checkpoints("qwen3"), local_blocks=True, tuning_mode="deep_ptune", pre_seq_len=2, eos_token_id=None
    )
    ids = rows(seed=8)[0][None]
    at_once = model.generate(ids, max_new_tokens=6)
    with model.inference_session(max_length=ids.shape[1] + 6) as session:
        first = model.generate(ids, max_new_tokens=3, session=session)
        # the session was fed every token but the last new one: the next call starts from it
        second = model.generate(first[:, -1:], max_new_tokens=3, session=session)
    assert torch.cat([first, second[:, 1:]], dim=1).tolist() == at_once.tolist()


def test_seeded_sampling_repeats_and_differs_between_seeds(checkpoints):
    model = AutoDistributedModelForCausalLM.from_pretrained(checkpoints("llama"), local_blocks=True, eos_token_id=None)
    ids = rows(seed=6)[0][None].repeat(2, 1)
    samples = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        samples.append(model.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=40, top_p=0.95))
    assert torch.equal(samples[0], samples[1])
    assert not torch.equal(samples[0], samples[2])
    assert samples[0].shape == (2, ids.shape[1] + 12)


def test_seeded_sampling_equals_hugging_face_under_the_same_seed(checkpoints):
    path = checkpoints("llama")
    model = AutoDistributedModelForCausalLM.from_pretrained(path, local_blocks=True)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = rows(seed=7)[0][None]
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(11)
    ours = model.generate(ids, **options)
    torch.manual_seed(11)
    with torch.no_grad():
        theirs = reference.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=PAD, **options)
    assert ours.tolist() == theirs.tolist()


def test_a_session_refuses_more_tokens_than_its_max_length(checkpoints):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        checkpoints("llama"), local_blocks=True, tuning_mode="ptune", pre_seq_len=4
    )
    with model.inference_session(max_length=5) as session:
        session.step(torch.tensor([[1, 2, 3, 4, 5]]))  # the prefix of 4 is reserved on top
        with pytest.raises(ValueError, match="max_length 5"):
            session.step(torch.tensor([[6]]))


def test_right_padding_is_refused_naming_left_padding(checkpoints):
    model = AutoDistributedModelForCausalLM.from_pretrained(checkpoints("llama"), local_blocks=True)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(torch.tensor([[1, 2, PAD]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)
