"""Tiny random checkpoints of every supported family, from transformers' own config classes (fp32).

Sizes are small but every feature a family adds is on: grouped key/value heads, sliding windows shorter
than the test sequences (Mistral, Qwen2's upper layers), Qwen3's head_dim, Mixtral's 4 experts with top-2
routing, both Falcon block layouts, Bloom's ALiBi. Weights are drawn wider than the default (std 0.2) so
that the blocks change the hidden states a lot and a wrong mask, position or prompt cannot hide.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PreTrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from ptune_search.tiny_llama import byte_level_tokenizer

NUM_LAYERS = 4
COMMON = dict(vocab_size=258, hidden_size=32, num_hidden_layers=NUM_LAYERS, pad_token_id=256, eos_token_id=257)
COMMON.update(bos_token_id=None, initializer_range=0.2)
ROTARY = dict(COMMON, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def tiny_config(variant: str) -> PreTrainedConfig:
    """``variant``: a model type, or ``falcon-new`` / ``falcon-parallel`` for Falcon's two block layouts."""
    if variant == "llama":
        return LlamaConfig(**ROTARY)
    if variant == "mistral":
        return MistralConfig(**ROTARY, sliding_window=5)
    if variant == "qwen2":
        return Qwen2Config(**ROTARY, use_sliding_window=True, sliding_window=5, max_window_layers=2)
    if variant == "qwen3":
        return Qwen3Config(**ROTARY, head_dim=16)
    if variant == "mixtral":
        return MixtralConfig(**ROTARY, num_local_experts=4, num_experts_per_tok=2)
    if variant == "falcon-new":
        return FalconConfig(**COMMON, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True)
    if variant == "falcon-parallel":
        return FalconConfig(**COMMON, num_attention_heads=4, parallel_attn=True, new_decoder_architecture=False)
    if variant == "bloom":
        return BloomConfig(**COMMON, n_head=4)
    raise ValueError(f"no tiny config for {variant!r}")


def make_tiny_checkpoint(out: str | Path, variant: str, seed: int = 0) -> Path:
    """Write a random ``variant`` checkpoint (safetensors, byte-level tokenizer) to ``out``."""
    out = Path(out)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_config(variant)).save_pretrained(out)
    byte_level_tokenizer().save_pretrained(out)
    return out
