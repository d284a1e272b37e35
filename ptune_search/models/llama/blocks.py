"""Llama decoder blocks: loading a span of them and running it with deep prompts.

Clients with local blocks and block servers both call :func:`run_llama_span`, so a remote chain
computes exactly what the local one does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from ptune_search.models.checkpoint import read_tensors

ATTENTION_IMPLEMENTATION = "sdpa"


class LlamaBlockSpan(nn.Module):
    """Frozen blocks ``start..end-1`` of a Llama model plus the rotary embedding they need."""

    def __init__(self, config: LlamaConfig, start: int, end: int, blocks: Sequence[LlamaDecoderLayer]):
        super().__init__()
        if len(blocks) != end - start:
            raise ValueError(f"span {start}:{end} needs {end - start} blocks, got {len(blocks)}")
        self.start, self.end = start, end
        self.blocks = nn.ModuleList(blocks)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.requires_grad_(False)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, config: LlamaConfig, start: int, end: int, dtype: torch.dtype = torch.float32
    ) -> "LlamaBlockSpan":
        """Load only the weights of blocks ``start..end-1``: memory grows with the span, not the model."""
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"block span {start}:{end} is outside the model's 0:{config.num_hidden_layers}")
        config = block_config(config)
        with torch.device("meta"):
            blocks = [LlamaDecoderLayer(config, layer_idx=i) for i in range(start, end)]

        def wanted(name: str) -> Optional[str]:
            parts = name.split(".")
            if len(parts) > 3 and parts[:2] == ["model", "layers"] and start <= int(parts[2]) < end:
                return f"{int(parts[2]) - start}.{'.'.join(parts[3:])}"
            return None

        state = read_tensors(path, wanted, dtype=dtype)
        holder = nn.ModuleList(blocks)
        holder.load_state_dict(state, strict=True, assign=True)
        span = cls(config, start, end, list(holder))
        return span.to(dtype)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, deep_prompts: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return run_llama_span(self.blocks, self.rotary_emb, hidden, attention_mask, deep_prompts)


def block_config(config: LlamaConfig) -> LlamaConfig:
    """A copy of ``config`` that the blocks run with (fixed attention implementation)."""
    config = LlamaConfig.from_dict(config.to_dict())
    config._attn_implementation = ATTENTION_IMPLEMENTATION
    return config


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a right-padded ``[B, T]`` 0/1 mask into an additive causal mask ``[B, 1, T, T]``."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def run_llama_span(
    blocks: Sequence[nn.Module],
    rotary_emb: LlamaRotaryEmbedding,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    deep_prompts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run ``hidden`` ``[B, T, H]`` through ``blocks`` in order.

    ``attention_mask`` is ``[B, T]`` (1 = token, 0 = right padding) and covers the prompt prefix, which
    takes positions ``0..P-1``. ``deep_prompts`` is ``[B, P * len(blocks), H]``; rows
    ``i * P .. (i + 1) * P - 1`` are added to the first ``P`` positions of block ``i``'s input.
    """
    batch, length, _ = hidden.shape
    position_ids = torch.arange(length, device=hidden.device).unsqueeze(0).expand(batch, -1)
    position_embeddings = rotary_emb(hidden, position_ids)
    bias = attention_bias(attention_mask, hidden.dtype)
    pre_seq_len = 0 if deep_prompts is None else deep_prompts.shape[1] // len(blocks)
    for index, block in enumerate(blocks):
        if pre_seq_len:
            prompt = deep_prompts[:, index * pre_seq_len : (index + 1) * pre_seq_len].to(hidden.dtype)
            hidden = torch.cat([hidden[:, :pre_seq_len] + prompt, hidden[:, pre_seq_len:]], dim=1)
        hidden = block(hidden, attention_mask=bias, position_ids=position_ids, position_embeddings=position_embeddings)
    return hidden
