"""A span of frozen decoder blocks of any family, loaded from a checkpoint and run with deep prompts.

Clients with local blocks and block servers both run spans through :meth:`DecoderBlockSpan.run`, so a remote
chain computes exactly what a local one does. A family's span is a small subclass naming transformers' own
decoder layer class and what else its layers take: rotary position embeddings (:class:`RotaryBlockSpan`) or
ALiBi biases. The prompt prefix takes positions ``0..P-1``; masks and positions cover it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn
from transformers import PreTrainedConfig

from ptune_search.models.checkpoint import read_tensors
from ptune_search.models.session_cache import LocalBlocksSession, SessionCache

ATTENTION_IMPLEMENTATION = "sdpa"


class DecoderBlockSpan(nn.Module):
    """Frozen blocks ``start..end-1`` of one model.

    Subclasses set ``layer_class`` (transformers' decoder layer) and ``checkpoint_prefix`` (where the
    checkpoint keeps block ``i``: ``<prefix>.<i>.``) and implement :meth:`layer_inputs`.
    """

    layer_class: ClassVar[type[nn.Module]]
    checkpoint_prefix: ClassVar[str] = "model.layers"
    cache_argument: ClassVar[str] = "cache"  # the keyword by which the layer class takes a key/value cache

    def __init__(self, config: PreTrainedConfig, start: int, end: int, blocks: list[nn.Module]):
        super().__init__()
        if len(blocks) != end - start:
            raise ValueError(f"span {start}:{end} needs {end - start} blocks, got {len(blocks)}")
        self.config, self.start, self.end = config, start, end
        self.blocks = nn.ModuleList(blocks)
        self.requires_grad_(False)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, config: PreTrainedConfig, start: int, end: int, dtype: torch.dtype = torch.float32
    ) -> "DecoderBlockSpan":
        """Load only the weights of blocks ``start..end-1``: memory grows with the span, not the model."""
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"block span {start}:{end} is outside the model's 0:{config.num_hidden_layers}")
        config = block_config(config)
        with torch.device("meta"):
            blocks = [cls.layer_class(config, layer_idx=i) for i in range(start, end)]
        depth = cls.checkpoint_prefix.count(".") + 1

        def wanted(name: str) -> Optional[str]:
            parts = name.split(".")
            if len(parts) > depth + 1 and ".".join(parts[:depth]) == cls.checkpoint_prefix and parts[depth].isdigit():
                index = int(parts[depth])
                if start <= index < end:
                    return f"{index - start}.{'.'.join(parts[depth + 1 :])}"
            return None

        state = cls.convert_checkpoint(read_tensors(path, wanted, dtype=dtype))
        holder = nn.ModuleList(blocks)
        holder.load_state_dict(state, strict=True, assign=True)
        return cls(config, start, end, list(holder)).to(dtype)

    @classmethod
    def convert_checkpoint(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (``<block>.<name>``) as the layer class names them; most families need nothing."""
        return state

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def layer_inputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> list[dict[str, Any]]:
        """Keyword arguments of each block's call for this batch: masks and positions, prefix included."""
        raise NotImplementedError

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, deep_prompts: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self.run(self.start, self.end, hidden, attention_mask, deep_prompts)

    def run(
        self,
        start: int,
        end: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        deep_prompts: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run ``hidden`` ``[B, T, H]`` through blocks ``start..end-1`` (model indices, inside this span).

        ``attention_mask`` is ``[B, T]`` (1 = token, 0 = right padding) and covers the prompt prefix, which
        takes positions ``0..P-1``. ``deep_prompts`` is ``[B, P * (end - start), H]``; rows
        ``i * P .. (i + 1) * P - 1`` are added to the first ``P`` positions of the ``i``-th block's input.
        """
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks {start}:{end} are outside this span {self.start}:{self.end}")
        blocks = self.blocks[start - self.start : end - self.start]
        inputs = self.layer_inputs(hidden, attention_mask)[start - self.start : end - self.start]
        pre_seq_len = 0 if deep_prompts is None else deep_prompts.shape[1] // len(blocks)
        for index, (block, kwargs) in enumerate(zip(blocks, inputs)):
            if pre_seq_len:
                prompt = deep_prompts[:, index * pre_seq_len : (index + 1) * pre_seq_len].to(hidden.dtype)
                hidden = torch.cat([hidden[:, :pre_seq_len] + prompt, hidden[:, pre_seq_len:]], dim=1)
            output = block(hidden, **kwargs)
            hidden = output[0] if isinstance(output, tuple) else output  # Falcon and Bloom layers return tuples
        return hidden

    def step_inputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor, past: int) -> list[dict[str, Any]]:
        """Like :meth:`layer_inputs`, for the ``t`` new positions ``hidden`` ``[B, t, H]`` of an inference step
        after ``past`` cached ones; ``attention_mask`` ``[B, past + t]`` covers them all (padding anywhere)."""
        raise NotImplementedError

    def run_step(
        self,
        start: int,
        end: int,
        hidden: torch.Tensor,
        cache: SessionCache,
        step_mask: torch.Tensor,
        deep_prompts: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """One inference step through blocks ``start..end-1``: the new positions ``hidden`` ``[B, t, H]`` attend
        to themselves and to the positions ``cache`` holds, and are added to it.

        ``deep_prompts`` (as in :meth:`run`) are added to the new positions that fall in the prompt prefix.
        """
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks {start}:{end} are outside this span {self.start}:{self.end}")
        blocks = self.blocks[start - self.start : end - self.start]
        past, length = cache.length, hidden.shape[1]
        inputs = self.step_inputs(hidden, cache.begin_step(step_mask), past)[start - self.start : end - self.start]
        pre_seq_len = 0 if deep_prompts is None else deep_prompts.shape[1] // len(blocks)
        covered = max(0, min(pre_seq_len, past + length) - past)
        with torch.no_grad():
            for index, (block, kwargs) in enumerate(zip(blocks, inputs)):
                if covered:
                    rows = deep_prompts[:, index * pre_seq_len + past : index * pre_seq_len + past + covered]
                    hidden = torch.cat([hidden[:, :covered] + rows.to(hidden.dtype), hidden[:, covered:]], dim=1)
                output = block(hidden, **kwargs, **{self.cache_argument: cache})
                hidden = output[0] if isinstance(output, tuple) else output
        cache.commit_step()
        return hidden

    def inference_session(self, batch_size: int, max_length: int, pre_seq_len: int = 0) -> LocalBlocksSession:
        """A session of at most ``max_length`` positions (the prompt prefix included) over the whole span."""
        return LocalBlocksSession(self, batch_size, max_length, pre_seq_len)

    def cache_bytes_per_position(self) -> int:
        """Bytes a session's cache holds per row and position over the whole span (measured by one step)."""
        cache = SessionCache(1, 1)
        hidden = torch.zeros(1, 1, self.hidden_size, dtype=next(self.parameters()).dtype)
        self.run_step(self.start, self.end, hidden, cache, torch.ones(1, 1, dtype=torch.long))
        return cache.nbytes


class RotaryBlockSpan(DecoderBlockSpan):
    """Blocks that take rotary position embeddings (``rotary_class``, as the family's model builds them) and
    an additive causal mask, windowed for the layers that use sliding-window attention."""

    rotary_class: ClassVar[type[nn.Module]]

    def __init__(self, config: PreTrainedConfig, start: int, end: int, blocks: list[nn.Module]):
        super().__init__(config, start, end, blocks)
        self.rotary_emb = self.rotary_class(config=config)
        self.windows = [sliding_window(config, index) for index in range(start, end)]

    def layer_inputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> list[dict[str, Any]]:
        batch, length, _ = hidden.shape
        position_ids = torch.arange(length, device=hidden.device).unsqueeze(0).expand(batch, -1)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        masks = {window: attention_bias(attention_mask, hidden.dtype, window) for window in set(self.windows)}
        shared = {"position_ids": position_ids, "position_embeddings": position_embeddings, **self.extra_inputs()}
        return [{"attention_mask": masks[window], **shared} for window in self.windows]

    def step_inputs(self, hidden: torch.Tensor, attention_mask: torch.Tensor, past: int) -> list[dict[str, Any]]:
        position_ids = token_positions(attention_mask)[:, past:]
        position_embeddings = self.rotary_emb(hidden, position_ids)
        masks = {
            window: step_attention_bias(attention_mask, past, hidden.dtype, window) for window in set(self.windows)
        }
        shared = {"position_ids": position_ids, "position_embeddings": position_embeddings, **self.extra_inputs()}
        return [{"attention_mask": masks[window], **shared} for window in self.windows]

    def extra_inputs(self) -> dict[str, Any]:
        """Arguments a family's layer needs besides masks and positions."""
        return {}


def sliding_window(config: PreTrainedConfig, index: int) -> Optional[int]:
    """The attention window of block ``index``, or None for full causal attention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[index] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def block_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """A copy of ``config`` that the blocks run with (fixed attention implementation)."""
    config = type(config).from_dict(config.to_dict())
    config._attn_implementation = ATTENTION_IMPLEMENTATION
    return config


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype, window: Optional[int] = None) -> torch.Tensor:
    """Turn a right-padded ``[B, T]`` 0/1 mask into an additive causal mask ``[B, 1, T, T]``.

    With ``window``, a position sees only the ``window`` latest positions, itself included.
    """
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    if window is not None:
        causal = causal.triu(-(window - 1))
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` position of each token among its row's tokens (padding anywhere takes no position)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def step_attention_bias(
    attention_mask: torch.Tensor, past: int, dtype: torch.dtype, window: Optional[int] = None
) -> torch.Tensor:
    """Additive mask ``[B, 1, t, past + t]`` of an inference step's ``t`` new positions over all positions.

    A position sees the tokens up to itself; with ``window``, only those fewer than ``window`` positions back
    (counted in token positions, so left padding in the cache does not narrow the window).
    """
    total = attention_mask.shape[1]
    queries = torch.arange(past, total, device=attention_mask.device)
    keys = torch.arange(total, device=attention_mask.device)
    allowed = (keys[None, :] <= queries[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
    if window is not None:
        positions = token_positions(attention_mask)
        distance = positions[:, past:, None] - positions[:, None, :]
        allowed = allowed & (distance < window)[:, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)
