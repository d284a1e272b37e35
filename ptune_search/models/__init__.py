"""Model families whose transformer blocks run in-process or on a swarm of block servers.

The model classes are imported on first use, so that ``ptune_search.models.ptune`` (imported by the config)
does not pull in transformers. :mod:`~ptune_search.models.registry` lists the families; each is one folder here.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AutoDistributedModelForSequenceClassification": "ptune_search.models.registry",
    "AutoDistributedModelForCausalLM": "ptune_search.models.registry",
    "family_of": "ptune_search.models.registry",
    "supported_model_types": "ptune_search.models.registry",
    "DistributedLlamaConfig": "ptune_search.models.llama.model",
    "DistributedLlamaForCausalLM": "ptune_search.models.llama.model",
    "DistributedLlamaForSequenceClassification": "ptune_search.models.llama.model",
    "DistributedLlamaModel": "ptune_search.models.llama.model",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
