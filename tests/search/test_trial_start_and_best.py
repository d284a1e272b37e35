"""A trial starts from the head it is given (LP-FT) or from label words, trains its head at its own rate, and
reports and saves its best evaluation, not its last: the tiny model on local blocks, trials built as Tune does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ptune_search.data import TaskSpec, load_task
from ptune_search.models.label_words import label_word_tokens, label_words
from ptune_search.models.prompt_folder import HEAD_FILE, PROMPT_FILE
from ptune_search.search.trial import PromptTuningTrial, TrialSettings, build_classifier, ptune_config_of
from ptune_search.training.steps import evaluate

STEPS, EVAL_EVERY = 8, 1
# A rate high enough that the tiny model's validation accuracy goes up and down from one step to the next.
NOISY = {"tuning_mode": "deep_ptune", "pre_seq_len": 3, "lr": 0.3, "prompt_init": "labels"}


@pytest.fixture(scope="module")
def settings(tiny_model_path: Path) -> TrialSettings:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    task = load_task(TaskSpec(), tokenizer, 32, train_size=40, validation_size=20, seed=0)
    return TrialSettings(
        str(tiny_model_path), task, max_steps=STEPS, eval_every=EVAL_EVERY, batch_size=4, seed=0, eval_batch_size=20
    )


def local_trial(settings: TrialSettings, config: dict[str, Any]) -> PromptTuningTrial:
    class LocalTrial(PromptTuningTrial):  # built directly, outside Tune, with the settings Tune would pass
        def setup(self, config):
            super().setup(config, settings=settings)

    return LocalTrial(dict(config))


def test_a_trial_reports_and_saves_its_best_evaluation_not_its_last(settings, tmp_path):
    trial = local_trial(settings, NOISY)
    results = [trial.step() for _ in range(STEPS)]
    evaluations = [(r["eval_accuracy"], -r["eval_loss"], r["step"]) for r in results]
    assert len({accuracy for accuracy, _, _ in evaluations}) > 1, "the accuracy never moved: nothing to choose"
    best_accuracy, best_negative_loss, best_step = max(evaluations, key=lambda e: (e[0], e[1]))
    last = results[-1]
    assert (last["val_accuracy"], -last["val_loss"], last["best_step"]) == (
        best_accuracy,
        best_negative_loss,
        best_step,
    )
    for index, result in enumerate(results):  # each report is the best so far
        assert result["val_accuracy"] == max(accuracy for accuracy, _, _ in evaluations[: index + 1])

    trial.save_checkpoint(str(tmp_path))
    saved = {**load_file(tmp_path / PROMPT_FILE), **load_file(tmp_path / HEAD_FILE)}
    model = build_classifier(settings.model_path, settings.task.num_labels, 256, ptune_config_of(NOISY), None)
    model.load_state_dict(saved, strict=False)
    evaluation = evaluate(model, settings.task.validation, settings.eval_batch_size)
    assert (evaluation.accuracy, evaluation.loss) == pytest.approx((best_accuracy, -best_negative_loss), abs=1e-6)


def test_a_retried_trial_goes_on_from_its_current_state_and_keeps_its_best(settings, tmp_path):
    trial = local_trial(settings, NOISY)
    for _ in range(STEPS // 2):
        trial.step()
    trial.save_checkpoint(str(tmp_path))
    rest = [trial.step() for _ in range(STEPS // 2)]

    retried = local_trial(settings, NOISY)
    retried.load_checkpoint(str(tmp_path))
    again = [retried.step() for _ in range(STEPS // 2)]
    for key in ("eval_loss", "val_accuracy", "val_loss", "best_step"):
        assert [r[key] for r in again] == pytest.approx([r[key] for r in rest], abs=1e-6), key


def test_a_linear_trial_starts_from_the_given_head_and_trains_it_at_the_head_rate(settings):
    head = torch.randn(settings.task.num_labels, 64, generator=torch.Generator().manual_seed(1))
    started = local_trial(TrialSettings(**{**settings.__dict__, "start_head": head, "head_lr": 0.0}), NOISY)
    assert torch.equal(started.model.score.weight.detach(), head)
    prompt_before = started.model.model.prompt_embeddings.weight.detach().clone()
    started.step()
    assert torch.equal(started.model.score.weight.detach(), head), "a head rate of 0 leaves the head as it started"
    assert not torch.equal(started.model.model.prompt_embeddings.weight.detach(), prompt_before)


def test_a_label_words_trial_starts_from_the_lm_head_rows_of_its_words(settings, tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)  # byte level: a word's first token is its first byte
    chosen = {name: name[0].upper() for name in settings.task.label_names if name != "tech"}
    words = label_words(settings.task.label_names, chosen)
    assert words == ["B", "E", "P", "S", " tech"]
    tokens = tuple(label_word_tokens(tokenizer, words))
    config = {**NOISY, "head": "label_words"}
    trial = local_trial(TrialSettings(**{**settings.__dict__, "label_word_tokens": tokens}), config)
    lm_head = load_file(tiny_model_path / "model.safetensors")["lm_head.weight"]  # the tiny Llama's is untied
    assert torch.equal(trial.model.score.weight.detach(), lm_head[torch.tensor(tokens)])


def test_label_words_of_classes_the_task_lacks_or_sharing_a_first_token_are_refused(settings, tiny_model_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match=r"\['sport'\], which are not classes of the task"):
        label_words(settings.task.label_names, {"sport": "S"})
    with pytest.raises(ValueError, match=r"\[' business', ' tech'\] start with the same token"):
        label_word_tokens(tokenizer, [" business", "E", " tech"])
