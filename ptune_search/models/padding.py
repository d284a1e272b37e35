"""Padding layouts of a batch: the blocks and the prompt prefix assume right padding, callers may pad left.

The prompt prefix takes positions ``0..P-1`` and the tokens follow it; with left padding the pads would sit
between the prompt and the tokens and shift every position. :class:`RightPadding` moves each row's tokens
to the front before the blocks run and puts the outputs back where the caller had them, so a left-padded
batch computes what the same batch padded right computes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class RightPadding:
    """Where each row's tokens start (``shifts``) in the caller's batch, and the right-padded mask.

    Example::

        attention_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # the first row padded left
        embeds = torch.randn(2, 4, 8)
        layout = RightPadding.of(attention_mask)
        outputs = layout.apply(embeds)  # the blocks run here, on the rows' tokens first, with layout.mask
        hidden = layout.restore(outputs)  # back where the caller's tokens were: equal to embeds here
    """

    mask: torch.Tensor  # [B, T], the tokens of each row first
    shifts: Optional[torch.Tensor]  # [B] pads before each row's tokens; None when the batch is right-padded

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> "RightPadding":
        """Check ``attention_mask`` ``[B, T]`` (0/1, each row one run of tokens) and note its layout."""
        tokens = _checked_tokens(attention_mask)
        length = tokens.shape[1]
        counts = tokens.sum(dim=1)
        starts = tokens.int().argmax(dim=1)
        positions = torch.arange(length, device=tokens.device)
        right_mask = (positions[None] < counts[:, None]).to(attention_mask.dtype)
        if not bool(starts.any()):
            return cls(attention_mask, None)
        return cls(right_mask, starts)

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[B, T, H]`` in the caller's layout -> the same rows with their tokens first."""
        return hidden if self.shifts is None else _roll_rows(hidden, self.shifts)

    def restore(self, hidden: torch.Tensor) -> torch.Tensor:
        """Outputs ``[B, T, H]`` of :meth:`apply`'s layout -> back where the caller's tokens were."""
        return hidden if self.shifts is None else _roll_rows(hidden, -self.shifts)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` position of each row's last real token, left or right padding alike."""
    tokens = _checked_tokens(attention_mask)
    return tokens.shape[1] - 1 - tokens.int().flip(dims=[1]).argmax(dim=1)


def _checked_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, length], got shape {tuple(attention_mask.shape)}")
    tokens = attention_mask != 0
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask may hold only 0 (padding) and 1 (token)")
    counts = tokens.sum(dim=1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"attention_mask rows {empty} are all zeros: a row needs at least one token; drop empty rows from the batch"
        )
    starts = tokens.int().argmax(dim=1)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    one_run = (positions[None] >= starts[:, None]) & (positions[None] < (starts + counts)[:, None])
    gapped = (one_run != tokens).any(dim=1).nonzero().flatten().tolist()
    if gapped:
        raise ValueError(
            f"attention_mask rows {gapped} have padding between tokens: pad each row on one side only "
            "(tokenizer padding_side 'left' or 'right')"
        )
    return tokens


def _roll_rows(hidden: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Row ``b`` rotated left by ``shifts[b]`` positions (right for negative shifts)."""
    length = hidden.shape[1]
    positions = torch.arange(length, device=hidden.device)
    index = (positions[None] + shifts[:, None]) % length
    return hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[2]))
