"""Qwen3 (dense): Llama's block with RMS-normalised queries and keys."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from ptune_search.models.decoder_span import RotaryBlockSpan
from ptune_search.models.distributed import (
    DistributedForCausalLM,
    DistributedForSequenceClassification,
    DistributedModel,
)
from ptune_search.models.ptune import PTuneConfig
from ptune_search.swarm.client.client_config import ClientConfig


@strict
class DistributedQwen3Config(Qwen3Config, ClientConfig, PTuneConfig):
    """Qwen3Config plus prompt tuning (PTuneConfig) and how the client reaches the swarm (ClientConfig)."""


class Qwen3BlockSpan(RotaryBlockSpan):
    layer_class, rotary_class = Qwen3DecoderLayer, Qwen3RotaryEmbedding


class DistributedQwen3Model(DistributedModel):
    config_class, span_class, norm_class = DistributedQwen3Config, Qwen3BlockSpan, Qwen3RMSNorm


class DistributedQwen3ForCausalLM(DistributedForCausalLM):
    base_class = DistributedQwen3Model


class DistributedQwen3ForSequenceClassification(DistributedForSequenceClassification):
    base_class = DistributedQwen3Model
