"""The prompt-tuning loop shared by the demo and the search trials: steps, evaluation, throughput."""

from __future__ import annotations

import dataclasses
import time

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


@torch.no_grad()
def evaluate(model: nn.Module, split: TokenizedSplit, batch_size: int) -> Evaluation:
    """Mean cross-entropy and accuracy over the whole split, in its stored order."""
    model.eval()
    logits = torch.cat([model(**batch).logits.float() for batch in split.batches(batch_size)])
    loss = nn.functional.cross_entropy(logits, split.labels).item()
    accuracy = (logits.argmax(dim=-1) == split.labels).float().mean().item()
    return Evaluation(loss=loss, accuracy=accuracy, logits=logits)
