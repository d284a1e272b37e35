"""The prompt-tuning loop shared by the demo and the search trials: steps, evaluation, throughput."""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import torch
from torch import nn

from ptune_search.data import Batch, TokenizedSplit


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float
    tokens: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    logits: torch.Tensor


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> StepResult:
    """One optimizer step on one batch; ``tokens`` counts real (unpadded) tokens for throughput."""
    started = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()}; lower the learning rate")
    loss.backward()
    optimizer.step()
    return StepResult(
        loss=loss.item(), tokens=int(batch["attention_mask"].sum()), seconds=time.perf_counter() - started
    )


def evaluate(model: nn.Module, split: TokenizedSplit, batch_size: int) -> Evaluation:
    """Mean cross-entropy and accuracy over the whole split, in its stored order."""
    return evaluation_of(torch.cat(list(batch_logits(model, split, batch_size))), split.labels)


@torch.no_grad()
def batch_logits(model: nn.Module, split: TokenizedSplit, batch_size: int) -> Iterator[torch.Tensor]:
    """Each batch's logits, computed as it is asked for: a caller may stop an evaluation between batches."""
    model.eval()
    for batch in split.batches(batch_size):
        yield model(**batch).logits.float()


def evaluation_of(logits: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    loss = nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(dim=-1) == labels).float().mean().item()
    return Evaluation(loss=loss, accuracy=accuracy, logits=logits)
