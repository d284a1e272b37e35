"""The attention keys and values of one inference session over a span of blocks, and that session run locally.

An inference session feeds a span its positions a few at a time (the prompt prefix and the input first, then
one new token per step); each block's attention reads the keys and values of all earlier positions from a
:class:`SessionCache` instead of recomputing them. The cache holds, per block, one buffer of
``[batch, kv_heads, max_length, head_dim]`` for keys and one for values, allocated at the block's first step,
so a session never holds more than ``max_length`` positions (block servers reserve that memory when the
session opens, see ``swarm/server/inference.py``). It also keeps the attention mask of the positions so far:
positions are counted from it (``cumsum - 1``), so left padding inside the cache changes no position.

The cache is duck-typed as transformers' ``Cache``: attention layers call ``update(keys, values, layer_idx)``
with the new positions' keys and values and get those of all positions back.

Example::

    from transformers import AutoConfig

    from ptune_search.models.llama.model import LlamaBlockSpan

    config = AutoConfig.from_pretrained(path)
    span = LlamaBlockSpan.from_checkpoint(path, config, 0, config.num_hidden_layers)
    hidden = torch.randn(1, 6, config.hidden_size)
    with LocalBlocksSession(span, batch_size=1, max_length=16) as session:
        out = session.step(hidden[:, :5], torch.ones(1, 5, dtype=torch.long))  # positions 0..4
        out = session.step(hidden[:, 5:6], torch.ones(1, 1, dtype=torch.long))  # position 5, from the cache
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch


class SessionCache:
    """Keys and values of ``batch_size`` rows and at most ``max_length`` positions, for any blocks."""

    def __init__(self, batch_size: int, max_length: int):
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"a session needs batch_size and max_length >= 1 (got {batch_size}, {max_length})")
        self.batch_size, self.max_length = batch_size, max_length
        self.length = 0  # positions whose keys and values are stored
        self.mask = torch.zeros(batch_size, max_length, dtype=torch.long)
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._step = 0  # positions of the step being run

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers allocated so far (read from any thread: the dicts are copied at once)."""
        buffers = list(self._keys.values()) + list(self._values.values())
        return sum(t.numel() * t.element_size() for t in buffers)

    def begin_step(self, step_mask: torch.Tensor) -> torch.Tensor:
        """Start a step of ``step_mask.shape[1]`` new positions; returns the mask of all positions ``[B, past + t]``."""
        batch, length = step_mask.shape
        if batch != self.batch_size:
            raise ValueError(f"the session has batch size {self.batch_size}, the step {batch}")
        if self.length + length > self.max_length:
            raise ValueError(
                f"the step's {length} positions after {self.length} exceed the session's max_length {self.max_length}"
            )
        self.mask[:, self.length : self.length + length] = step_mask
        self._step = length
        return self.mask[:, : self.length + length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's keys and values ``[B, heads, t, head_dim]`` of block ``layer_idx``; return all so far."""
        if layer_idx not in self._keys:
            batch, heads, _, size = key_states.shape
            self._keys[layer_idx] = key_states.new_zeros(batch, heads, self.max_length, size)
            self._values[layer_idx] = value_states.new_zeros(batch, value_states.shape[1], self.max_length, size)
        end = self.length + key_states.shape[-2]
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        keys[:, :, self.length : end] = key_states
        values[:, :, self.length : end] = value_states
        return keys[:, :, :end], values[:, :, :end]

    def commit_step(self) -> None:
        self.length += self._step
        self._step = 0

    def free(self) -> None:
        self._keys.clear()
        self._values.clear()


class SteppedSpan(Protocol):
    """A span of blocks that runs inference steps (decoder_span.DecoderBlockSpan)."""

    start: int
    end: int

    def run_step(
        self,
        start: int,
        end: int,
        hidden: torch.Tensor,
        cache: SessionCache,
        step_mask: torch.Tensor,
        deep_prompts: Optional[torch.Tensor] = None,
    ) -> torch.Tensor: ...


class LocalBlocksSession:
    """An inference session over a span in this process: what a block server runs, for local blocks."""

    def __init__(self, span: SteppedSpan, batch_size: int, max_length: int, pre_seq_len: int = 0):
        if not 0 <= pre_seq_len < max_length:
            raise ValueError(f"pre_seq_len {pre_seq_len} must be below the session's max_length {max_length}")
        self.span, self.pre_seq_len = span, pre_seq_len
        self.cache = SessionCache(batch_size, max_length)

    @property
    def position(self) -> int:
        return self.cache.length

    def step(
        self, hidden: torch.Tensor, step_mask: torch.Tensor, deep_prompts: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The span's output for the new positions ``hidden`` ``[B, t, H]`` (``step_mask`` ``[B, t]``)."""
        prompts = deep_prompts if self.position < self.pre_seq_len else None
        return self.span.run_step(self.span.start, self.span.end, hidden, self.cache, step_mask, prompts)

    def close(self) -> None:
        self.cache.free()

    def __enter__(self) -> "LocalBlocksSession":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
