"""Where prompts start: each init gives the documented rows, and a retried or resumed trial keeps them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from ptune_search.data import TaskSpec, load_task
from ptune_search.models.prompt_init import VOCAB_POOL, apply_prompt_init, check_prompt_init
from ptune_search.models.ptune import PTuneConfig
from ptune_search.search.trial import PromptTuningTrial, TrialSettings, build_classifier, prompt_init_tokens

PRE_SEQ_LEN = 12


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: Path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def task(tokenizer):
    return load_task(TaskSpec(), tokenizer, 32, train_size=40, validation_size=10, seed=0, test_size=10)


def _model(tiny_model_path: Path, tokenizer, mode: str = "deep_ptune"):
    torch.manual_seed(0)
    return build_classifier(str(tiny_model_path), 5, tokenizer.pad_token_id, PTuneConfig(PRE_SEQ_LEN, mode), None)


def _initialised(tiny_model_path, tokenizer, task, init):
    model = _model(tiny_model_path, tokenizer)
    tokens = prompt_init_tokens(init, PTuneConfig(PRE_SEQ_LEN, "deep_ptune"), tokenizer, task, seed=0)
    apply_prompt_init(model.model, tokens)
    return model, tokens


def _embeddings(model, words: list[str], tokenizer) -> torch.Tensor:
    ids = [token for word in words for token in tokenizer(word, add_special_tokens=False)["input_ids"]]
    rows = model.model.embed_tokens.weight[torch.tensor(ids)]
    return rows.repeat((PRE_SEQ_LEN + len(ids) - 1) // len(ids), 1)[:PRE_SEQ_LEN]


def test_labels_init_copies_the_class_names_token_embeddings(tiny_model_path, tokenizer, task):
    model, _ = _initialised(tiny_model_path, tokenizer, task, "labels")
    expected = _embeddings(model, [f" {name}" for name in task.label_names], tokenizer)
    assert torch.equal(model.model.prompt_embeddings.weight.detach(), expected)
    assert not model.model.intermediate_prompt_embeddings.weight.any(), "deep rows start at zero in every init"


def test_text_init_copies_the_texts_token_embeddings_repeated(tiny_model_path, tokenizer, task):
    model, _ = _initialised(tiny_model_path, tokenizer, task, "text:classify the news")
    expected = _embeddings(model, [" classify the news"], tokenizer)
    assert torch.equal(model.model.prompt_embeddings.weight.detach(), expected)


def test_vocab_init_samples_distinct_frequent_training_tokens(tiny_model_path, tokenizer, task):
    model, tokens = _initialised(tiny_model_path, tokenizer, task, "vocab")
    counts = Counter(task.train.input_ids[task.train.attention_mask.bool()].tolist())
    frequent = {token for token, _ in counts.most_common(VOCAB_POOL)}
    assert len(set(tokens)) == PRE_SEQ_LEN and set(tokens) <= frequent
    expected = model.model.embed_tokens.weight[torch.tensor(tokens)]
    assert torch.equal(model.model.prompt_embeddings.weight.detach(), expected)
    again = prompt_init_tokens("vocab", PTuneConfig(PRE_SEQ_LEN, "deep_ptune"), tokenizer, task, seed=0)
    assert again == tokens, "the sample is seeded"


def test_random_init_keeps_the_rows_init_prompts_drew(tiny_model_path, tokenizer, task):
    model, tokens = _initialised(tiny_model_path, tokenizer, task, "random")
    assert tokens is None
    assert torch.equal(
        model.model.prompt_embeddings.weight, _model(tiny_model_path, tokenizer).model.prompt_embeddings.weight
    )


@pytest.mark.parametrize("init", ["", "words", "text:", "text:   ", "Labels"])
def test_unknown_inits_are_refused(init):
    with pytest.raises(ValueError, match="random, vocab, labels or text:<words>"):
        check_prompt_init(init)


def test_a_retried_trial_starts_from_its_init_and_resumes_its_trained_rows(tiny_model_path, tokenizer, task, tmp_path):
    settings = TrialSettings(
        str(tiny_model_path), task, max_steps=4, eval_every=2, batch_size=4, seed=0, eval_batch_size=8
    )

    class LocalTrial(PromptTuningTrial):  # built directly, outside Tune, with the settings Tune would pass
        def setup(self, config):
            super().setup(config, settings=settings)

    config = {"tuning_mode": "deep_ptune", "pre_seq_len": PRE_SEQ_LEN, "lr": 0.05, "prompt_init": "labels"}
    first = LocalTrial(dict(config))
    labels = _embeddings(first.model, [f" {name}" for name in task.label_names], tokenizer)
    assert torch.equal(first.model.model.prompt_embeddings.weight.detach(), labels)
    first.step()
    trained = first.model.model.prompt_embeddings.weight.detach().clone()
    assert not torch.equal(trained, labels)
    first.save_checkpoint(str(tmp_path))

    retried = LocalTrial(dict(config))
    assert torch.equal(retried.model.model.prompt_embeddings.weight.detach(), labels), "same init on a retry"
    retried.load_checkpoint(str(tmp_path))
    assert torch.equal(retried.model.model.prompt_embeddings.weight.detach(), trained)
    assert retried.step()["step"] == 4
