"""Mistral 7B and its kin: Llama's block with sliding-window attention."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRMSNorm, MistralRotaryEmbedding

from ptune_search.models.decoder_span import RotaryBlockSpan
from ptune_search.models.distributed import (
    DistributedForCausalLM,
    DistributedForSequenceClassification,
    DistributedModel,
)
from ptune_search.models.ptune import PTuneConfig
from ptune_search.swarm.client.client_config import ClientConfig


@strict
class DistributedMistralConfig(MistralConfig, ClientConfig, PTuneConfig):
    """MistralConfig plus prompt tuning (PTuneConfig) and how the client reaches the swarm (ClientConfig)."""


class MistralBlockSpan(RotaryBlockSpan):
    layer_class, rotary_class = MistralDecoderLayer, MistralRotaryEmbedding


class DistributedMistralModel(DistributedModel):
    config_class, span_class, norm_class = DistributedMistralConfig, MistralBlockSpan, MistralRMSNorm


class DistributedMistralForCausalLM(DistributedForCausalLM):
    base_class = DistributedMistralModel


class DistributedMistralForSequenceClassification(DistributedForSequenceClassification):
    base_class = DistributedMistralModel
