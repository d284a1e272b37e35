"""Qwen2 and Qwen2.5: Llama's block with biased q/k/v projections and optional sliding windows."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from ptune_search.models.decoder_span import RotaryBlockSpan
from ptune_search.models.distributed import (
    DistributedForCausalLM,
    DistributedForSequenceClassification,
    DistributedModel,
)
from ptune_search.models.ptune import PTuneConfig
from ptune_search.swarm.client.client_config import ClientConfig


@strict
class DistributedQwen2Config(Qwen2Config, ClientConfig, PTuneConfig):
    """Qwen2Config plus prompt tuning (PTuneConfig) and how the client reaches the swarm (ClientConfig)."""


class Qwen2BlockSpan(RotaryBlockSpan):
    layer_class, rotary_class = Qwen2DecoderLayer, Qwen2RotaryEmbedding


class DistributedQwen2Model(DistributedModel):
    config_class, span_class, norm_class = DistributedQwen2Config, Qwen2BlockSpan, Qwen2RMSNorm


class DistributedQwen2ForCausalLM(DistributedForCausalLM):
    base_class = DistributedQwen2Model


class DistributedQwen2ForSequenceClassification(DistributedForSequenceClassification):
    base_class = DistributedQwen2Model
