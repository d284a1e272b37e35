"""Bloom: ALiBi attention biases instead of position embeddings, LayerNorms, and a LayerNorm on the word
embeddings before the first block (the client runs it, after prepending the prompts).

The ALiBi bias of a key is its position among the real tokens (``cumsum`` of the mask), so the prompt prefix
takes positions ``0..P-1`` as it does in rotary families.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import BloomConfig
from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

from ptune_search.models.decoder_span import DecoderBlockSpan, attention_bias, step_attention_bias
from ptune_search.models.distributed import (
    DistributedForCausalLM,
    DistributedForSequenceClassification,
    DistributedModel,
)
from ptune_search.models.ptune import PTuneConfig
from ptune_search.swarm.client.client_config import ClientConfig


@strict
class DistributedBloomConfig(BloomConfig, ClientConfig, PTuneConfig):
    """BloomConfig plus prompt tuning (PTuneConfig) and how the client reaches the swarm (ClientConfig)."""


class BloomBlockSpan(DecoderBlockSpan):
    layer_class = BloomBlock
    checkpoint_prefix = "transformer.h"
    cache_argument = "layer_past"

    def layer_inputs(self, hidden, attention_mask) -> list[dict[str, Any]]:
        alibi = build_alibi_tensor(attention_mask, self.config.n_head, hidden.dtype)
        inputs = {"alibi": alibi, "attention_mask": attention_bias(attention_mask, hidden.dtype)}
        return [inputs] * len(self.blocks)

    def step_inputs(self, hidden, attention_mask, past) -> list[dict[str, Any]]:
        alibi = build_alibi_tensor(attention_mask, self.config.n_head, hidden.dtype)  # biases of all keys
        inputs = {"alibi": alibi, "attention_mask": step_attention_bias(attention_mask, past, hidden.dtype)}
        return [inputs] * len(self.blocks)


class DistributedBloomModel(DistributedModel):
    config_class, span_class = DistributedBloomConfig, BloomBlockSpan
    checkpoint_names = {
        "embed_tokens": "transformer.word_embeddings",
        "input_norm": "transformer.word_embeddings_layernorm",
        "norm": "transformer.ln_f",
    }

    @classmethod
    def make_norm(cls, config: BloomConfig) -> nn.LayerNorm:
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    @classmethod
    def make_input_norm(cls, config: BloomConfig) -> nn.LayerNorm:
        return cls.make_norm(config)


class DistributedBloomForCausalLM(DistributedForCausalLM):
    base_class = DistributedBloomModel


class DistributedBloomForSequenceClassification(DistributedForSequenceClassification):
    base_class = DistributedBloomModel
