"""Falcon: rotary positions and LayerNorms, in both block layouts ``FalconConfig`` describes: the new decoder
architecture (Falcon-40B/180B: grouped key/value heads, attention and MLP in parallel off one or two norms)
and the older parallel-attention one (Falcon-7B). Checkpoints with ALiBi instead of rotary positions
(``alibi=True``, Falcon-RW) are refused.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import FalconConfig
from transformers.models.falcon.modeling_falcon import FalconDecoderLayer, FalconRotaryEmbedding

from ptune_search.models.decoder_span import RotaryBlockSpan
from ptune_search.models.distributed import (
    DistributedForCausalLM,
    DistributedForSequenceClassification,
    DistributedModel,
)
from ptune_search.models.ptune import PTuneConfig
from ptune_search.swarm.client.client_config import ClientConfig


@strict
class DistributedFalconConfig(FalconConfig, ClientConfig, PTuneConfig):
    """FalconConfig plus prompt tuning (PTuneConfig) and how the client reaches the swarm (ClientConfig)."""


class FalconBlockSpan(RotaryBlockSpan):
    layer_class, rotary_class = FalconDecoderLayer, FalconRotaryEmbedding
    checkpoint_prefix = "transformer.h"
    cache_argument = "layer_past"

    def __init__(self, config: FalconConfig, start: int, end: int, blocks: list[nn.Module]):
        check_rotary(config)
        super().__init__(config, start, end, blocks)

    def extra_inputs(self) -> dict[str, Any]:
        return {"alibi": None}


class DistributedFalconModel(DistributedModel):
    config_class, span_class = DistributedFalconConfig, FalconBlockSpan
    checkpoint_names = {"embed_tokens": "transformer.word_embeddings", "norm": "transformer.ln_f"}

    @classmethod
    def make_norm(cls, config: FalconConfig) -> nn.LayerNorm:
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    @classmethod
    def check_config(cls, config: FalconConfig) -> None:
        check_rotary(config)


class DistributedFalconForCausalLM(DistributedForCausalLM):
    base_class = DistributedFalconModel


class DistributedFalconForSequenceClassification(DistributedForSequenceClassification):
    base_class = DistributedFalconModel


def check_rotary(config: FalconConfig) -> None:
    if config.alibi:
        raise ValueError(
            "Falcon checkpoints with alibi=True (Falcon-RW) are not supported: only rotary-position Falcons are"
        )
