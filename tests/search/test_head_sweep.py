"""The head-only sweep: its candidate heads share one pass through the frozen blocks, and a split's features
are read from the blocks once however often the sweep evaluates on it (the tiny model on local blocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from ptune_search.data import TaskSpec, load_task
from ptune_search.models.registry import AutoDistributedModelForSequenceClassification
from ptune_search.search.head_sweep import HeadSweep, candidate_lrs
from ptune_search.training.steps import evaluate

LRS = candidate_lrs(5e-3, 5e-2, 4)


@pytest.fixture
def sweep_and_task(tiny_model_path: Path):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    task = load_task(TaskSpec(), tokenizer, 32, train_size=40, validation_size=20, seed=0)
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        tiny_model_path, local_blocks=True, num_labels=task.num_labels, pad_token_id=tokenizer.pad_token_id
    )
    return HeadSweep(model, LRS), task


def rows_through_blocks(model: torch.nn.Module) -> list[int]:
    """Counts the rows every forward through the model's first block carries."""
    seen: list[int] = []
    block = next(module for name, module in model.named_modules() if name.endswith("blocks.0"))
    block.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    return seen


def test_the_sweep_reads_a_splits_features_from_the_blocks_once(sweep_and_task):
    sweep, task = sweep_and_task
    seen = rows_through_blocks(sweep.model)
    batches = task.train_batches(8, 0)
    evaluations = []
    for _ in range(3):
        sweep.train_step(next(batches))
        evaluations.append(sweep.evaluate(task.validation, batch_size=8))
    assert sum(seen) == 3 * 8 + len(task.validation)  # three training batches, the validation split once

    chosen, evaluation = evaluations[-1]
    direct = evaluate(sweep.model, task.validation, batch_size=8)  # the chosen head, its features recomputed
    assert torch.allclose(evaluation.logits, direct.logits, atol=1e-5)
    assert evaluation.accuracy == direct.accuracy


def test_an_evaluation_on_the_first_examples_reads_the_same_features(sweep_and_task):
    sweep, task = sweep_and_task
    sweep.train_step(next(task.train_batches(8, 0)))
    sweep.evaluate(task.validation, batch_size=8)
    seen = rows_through_blocks(sweep.model)
    _, first = sweep.evaluate(task.validation, batch_size=8, size=5)
    assert seen == []
    direct = evaluate(sweep.model, task.validation.head(5), batch_size=8)  # the head it chose on those 5
    assert torch.allclose(first.logits, direct.logits, atol=1e-5)
