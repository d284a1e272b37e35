"""A short prompt-tuning run on local blocks: the packaged model learns the packaged task for a few steps."""

from __future__ import annotations

import dataclasses
import logging

import torch
from transformers import AutoTokenizer

from ptune_search.data import TaskSpec, load_task
from ptune_search.models.registry import AutoDistributedModelForSequenceClassification
from ptune_search.pretrained import resolve_model
from ptune_search.training.steps import evaluate, train_step, trainable_parameters

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    model: str = "smollm2-135m"
    task: str = "bbc_news"
    tuning_mode: str = "ptune"
    pre_seq_len: int = 16
    steps: int = 20
    batch_size: int = 8
    max_length: int = 64
    lr: float = 3e-3
    train_size: int = 400
    validation_size: int = 100
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DemoResult:
    losses: list[float]
    accuracy_before: float
    accuracy_after: float
    tokens_per_second: float


def run_demo(settings: DemoSettings) -> DemoResult:
    torch.manual_seed(settings.seed)
    path = resolve_model(settings.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    task = load_task(
        TaskSpec(settings.task),
        tokenizer,
        settings.max_length,
        settings.train_size,
        settings.validation_size,
        settings.seed,
    )
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        path,
        local_blocks=True,
        num_labels=task.num_labels,
        pad_token_id=tokenizer.pad_token_id,
        tuning_mode=settings.tuning_mode,
        pre_seq_len=settings.pre_seq_len,
    )
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=settings.lr)
    before = evaluate(model, task.validation, settings.batch_size)
    logger.info("validation accuracy before tuning: %.3f", before.accuracy)
    batches = task.train_batches(settings.batch_size, settings.seed)
    losses, tokens, seconds = [], 0, 0.0
    for step in range(1, settings.steps + 1):
        result = train_step(model, optimizer, next(batches))
        losses.append(result.loss)
        tokens, seconds = tokens + result.tokens, seconds + result.seconds
        logger.info("step %d/%d: train loss %.4f (%.1f s)", step, settings.steps, result.loss, result.seconds)
    after = evaluate(model, task.validation, settings.batch_size)
    logger.info("validation accuracy after %d steps: %.3f", settings.steps, after.accuracy)
    return DemoResult(losses, before.accuracy, after.accuracy, tokens / seconds)
