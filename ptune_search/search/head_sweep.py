"""The head-only baseline with a learning rate of its own: one head per candidate rate, chosen on validation.

Without prompts the blocks are frozen and see the same input whatever the head does, so every candidate
head can train on the same features: a batch goes through the blocks once, and each head takes its own
optimizer step on the pooled features. For the same reason the validation split's features are computed once,
and every later evaluation reads them again (4 evaluations cost what one does). The baseline costs one
trial, yet its learning rate is searched over the same range as the prompts' (log-spaced candidates), which
makes the comparison fair.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Optional

import torch
from torch import nn

from ptune_search.data import Batch, TokenizedSplit
from ptune_search.training.steps import Evaluation, StepResult, evaluation_of

FINE_TUNE_LR_SCALE = 0.2  # LP-FT: a fitted head goes on training with the prompts at a fifth of its sweep's rate


def candidate_lrs(low: float, high: float, count: int) -> list[float]:
    """``count`` learning rates spaced evenly on a log scale from ``low`` to ``high``."""
    if count == 1:
        return [math.sqrt(low * high)]
    return [low * (high / low) ** (index / (count - 1)) for index in range(count)]


class HeadSweep:
    """Candidate heads (copies of ``model.score`` at its init) with one AdamW param group per learning rate."""

    def __init__(self, model: nn.Module, lrs: list[float]):
        self.model, self.lrs = model, lrs
        self.heads = nn.ModuleList(copy.deepcopy(model.score) for _ in lrs)
        groups = [{"params": list(head.parameters()), "lr": lr} for head, lr in zip(self.heads, lrs)]
        self.optimizer = torch.optim.AdamW(groups)
        self._split_features: dict[int, tuple[TokenizedSplit, torch.Tensor]] = {}  # id -> (split, its features)

    def _features(self, batch: Batch) -> torch.Tensor:
        """The pooled features the model hands its head (captured at ``score``'s input; blocks run once)."""
        captured: list[torch.Tensor] = []
        hook = self.model.score.register_forward_hook(lambda module, args, output: captured.append(args[0]))
        try:
            with torch.no_grad():
                self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            hook.remove()
        return captured[0].detach()

    def train_step(self, batch: Batch) -> StepResult:
        """One step of every head; the loss reported is the mean over heads."""
        started = time.perf_counter()
        self.model.eval()
        features = self._features(batch)
        self.optimizer.zero_grad(set_to_none=True)
        losses = [nn.functional.cross_entropy(head(features), batch["labels"]) for head in self.heads]
        total = torch.stack(losses).sum()
        if not torch.isfinite(total):
            raise FloatingPointError(f"a baseline head's training loss is {total.item()}; lower the learning rates")
        total.backward()
        self.optimizer.step()
        tokens = int(batch["attention_mask"].sum())
        return StepResult(loss=total.item() / len(losses), tokens=tokens, seconds=time.perf_counter() - started)

    @torch.no_grad()
    def evaluate(self, split: TokenizedSplit, batch_size: int, size: Optional[int] = None) -> tuple[int, Evaluation]:
        """Every head on the first ``size`` examples of ``split`` (None: all); the best one (accuracy, then loss)
        is copied into ``model.score``."""
        self.model.eval()
        features = self._features_of(split, batch_size)[:size]
        labels = split.labels[:size]
        evaluations = [evaluation_of(head(features).float(), labels) for head in self.heads]
        best = max(range(len(self.heads)), key=lambda index: (evaluations[index].accuracy, -evaluations[index].loss))
        self.model.score.load_state_dict(self.heads[best].state_dict())
        return best, evaluations[best]

    def _features_of(self, split: TokenizedSplit, batch_size: int) -> torch.Tensor:
        """The split's features, computed at its first evaluation (the split is kept, so its id stays its own)."""
        if id(split) not in self._split_features:
            features = torch.cat([self._features(batch) for batch in split.batches(batch_size)])
            self._split_features[id(split)] = (split, features)
        return self._split_features[id(split)][1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        heads = enumerate(self.heads)
        return {f"{index}.{name}": tensor for index, head in heads for name, tensor in head.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for index, head in enumerate(self.heads):
            prefix = f"{index}."
            head.load_state_dict({name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)})
