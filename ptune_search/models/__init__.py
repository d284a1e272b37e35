"""Model families whose transformer blocks run in-process or on a swarm of block servers."""

from ptune_search.models.llama.model import (
    DistributedLlamaConfig,
    DistributedLlamaForCausalLM,
    DistributedLlamaForSequenceClassification,
    DistributedLlamaModel,
)

__all__ = [
    "DistributedLlamaConfig",
    "DistributedLlamaForCausalLM",
    "DistributedLlamaForSequenceClassification",
    "DistributedLlamaModel",
]
