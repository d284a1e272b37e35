"""Mixtral: Mistral's attention with a sparse mixture of experts (top-k routing) in place of the MLP.

Checkpoints keep each expert's ``w1``/``w2``/``w3`` under ``block_sparse_moe``; transformers' layer holds all
experts fused (``mlp.experts.gate_up_proj``, ``down_proj``), so a span converts the tensors it loads.
"""

from __future__ import annotations

import re

import torch
from huggingface_hub.dataclasses import strict
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRMSNorm, MixtralRotaryEmbedding

from ptune_search.models.decoder_span import RotaryBlockSpan
from ptune_search.models.distributed import (
    DistributedForCausalLM,
    DistributedForSequenceClassification,
    DistributedModel,
)
from ptune_search.models.ptune import PTuneConfig
from ptune_search.swarm.client.client_config import ClientConfig

_EXPERT_WEIGHT = re.compile(r"^(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


@strict
class DistributedMixtralConfig(MixtralConfig, ClientConfig, PTuneConfig):
    """MixtralConfig plus prompt tuning (PTuneConfig) and how the client reaches the swarm (ClientConfig)."""


class MixtralBlockSpan(RotaryBlockSpan):
    layer_class, rotary_class = MixtralDecoderLayer, MixtralRotaryEmbedding

    @classmethod
    def convert_checkpoint(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-expert ``w1``, ``w3`` (gate, up) and ``w2`` (down) -> fused ``gate_up_proj`` and ``down_proj``."""
        experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        converted = {}
        for name, tensor in state.items():
            match = _EXPERT_WEIGHT.match(name)
            if match:
                block, expert, weight = match.groups()
                experts.setdefault(block, {}).setdefault(int(expert), {})[weight] = tensor
            else:
                converted[name.replace(".block_sparse_moe.", ".mlp.")] = tensor
        for block, by_expert in experts.items():
            ordered = [by_expert[index] for index in sorted(by_expert)]
            converted[f"{block}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([e["w1"], e["w3"]]) for e in ordered]
            )
            converted[f"{block}.mlp.experts.down_proj"] = torch.stack([e["w2"] for e in ordered])
        return converted


class DistributedMixtralModel(DistributedModel):
    config_class, span_class, norm_class = DistributedMixtralConfig, MixtralBlockSpan, MixtralRMSNorm


class DistributedMixtralForCausalLM(DistributedForCausalLM):
    base_class = DistributedMixtralModel


class DistributedMixtralForSequenceClassification(DistributedForSequenceClassification):
    base_class = DistributedMixtralModel
