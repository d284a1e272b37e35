"""Trainable prompts for prompt tuning (P-Tuning v1 "ptune" and P-Tuning v2 "deep_ptune").

Layout of the deep prompts: ``intermediate_prompt_embeddings`` has ``pre_seq_len * num_layers``
rows and row ``l * pre_seq_len + p`` belongs to block ``l``, prefix position ``p``. ``get_prompt``
returns them as ``[batch, pre_seq_len * num_layers, hidden]`` in that order, so the rows of blocks
``a..b-1`` are the contiguous slice ``[a * pre_seq_len, b * pre_seq_len)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, get_args

import torch
from torch import nn

TuningMode = Literal["ptune", "deep_ptune"]
TUNING_MODES: tuple[str, ...] = get_args(TuningMode)


@dataclasses.dataclass
class PTuneConfig:
    pre_seq_len: int = 0  # 0: no prompt tuning
    tuning_mode: Optional[str] = None  # None, "ptune" or "deep_ptune"


def validate_ptune_settings(tuning_mode: Optional[str], pre_seq_len: int) -> None:
    """Raise ValueError naming the setting and the fix when a (tuning_mode, pre_seq_len) pair is unusable."""
    if tuning_mode is None:
        return
    if tuning_mode not in TUNING_MODES:
        raise ValueError(f"tuning_mode must be one of {TUNING_MODES} or None (got {tuning_mode!r})")
    if not isinstance(pre_seq_len, int) or isinstance(pre_seq_len, bool) or pre_seq_len <= 0:
        raise ValueError(
            f"pre_seq_len must be a positive int when tuning_mode is {tuning_mode!r} (got {pre_seq_len!r})"
        )


class PTuneMixin:
    """Adds trainable prompts to a model whose blocks stay frozen.

    ``init_prompts(config)`` reads ``config.tuning_mode``, ``config.pre_seq_len``, ``config.hidden_size`` and
    ``config.num_hidden_layers``. Prompts are float32 whatever the model's dtype, so tiny updates are not lost.
    """

    _keys_to_ignore_on_load_missing = [r"(intermediate_)?prompt_embeddings\.weight$"]

    def init_prompts(self, config: Any) -> None:
        tuning_mode = getattr(config, "tuning_mode", None)
        pre_seq_len = getattr(config, "pre_seq_len", 0)
        validate_ptune_settings(tuning_mode, pre_seq_len)
        self.tuning_mode = tuning_mode
        self.pre_seq_len = pre_seq_len if tuning_mode else 0
        self.num_prompt_layers = config.num_hidden_layers
        if not tuning_mode:
            return
        std = getattr(config, "initializer_range", 0.02)
        self.prompt_embeddings = nn.Embedding(pre_seq_len, config.hidden_size, dtype=torch.float32)
        nn.init.normal_(self.prompt_embeddings.weight, std=std)
        if tuning_mode == "deep_ptune":
            # Zeros: a fresh deep prompt starts as a plain "ptune" prompt and learns per-block offsets.
            self.intermediate_prompt_embeddings = nn.Embedding(
                pre_seq_len * config.num_hidden_layers, config.hidden_size, dtype=torch.float32
            )
            nn.init.zeros_(self.intermediate_prompt_embeddings.weight)

    def get_prompt(self, batch_size: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if not self.tuning_mode:
            return None, None
        prompts = self.prompt_embeddings.weight.unsqueeze(0).expand(batch_size, -1, -1)
        intermediate = None
        if self.tuning_mode == "deep_ptune":
            intermediate = self.intermediate_prompt_embeddings.weight.unsqueeze(0).expand(batch_size, -1, -1)
        return prompts, intermediate
