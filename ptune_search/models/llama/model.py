"""Llama (SmolLM2, Llama 2 and 3): rotary positions, RMSNorm, a gated MLP.

Example::

    model = DistributedLlamaForSequenceClassification.from_pretrained(
        path, num_labels=5, tuning_mode="deep_ptune", pre_seq_len=16, local_blocks=True
    )
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from ptune_search.models.decoder_span import RotaryBlockSpan
from ptune_search.models.distributed import (
    DistributedForCausalLM,
    DistributedForSequenceClassification,
    DistributedModel,
)
from ptune_search.models.ptune import PTuneConfig
from ptune_search.swarm.client.client_config import ClientConfig


@strict
class DistributedLlamaConfig(LlamaConfig, ClientConfig, PTuneConfig):
    """LlamaConfig plus prompt tuning (PTuneConfig) and how the client reaches the swarm (ClientConfig)."""


class LlamaBlockSpan(RotaryBlockSpan):
    layer_class, rotary_class = LlamaDecoderLayer, LlamaRotaryEmbedding


class DistributedLlamaModel(DistributedModel):
    config_class, span_class, norm_class = DistributedLlamaConfig, LlamaBlockSpan, LlamaRMSNorm


class DistributedLlamaForCausalLM(DistributedForCausalLM):
    base_class = DistributedLlamaModel


class DistributedLlamaForSequenceClassification(DistributedForSequenceClassification):
    base_class = DistributedLlamaModel
