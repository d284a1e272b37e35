"""Ray-distributed hyperparameter search for prompt tuning of LLMs whose blocks are served by a swarm.

The public API, imported on first use (``import ptune_search`` stays cheap for the command line):

- :func:`load_config`, :func:`run_search`: an experiment config and the search it describes;
- :class:`PTuneConfig`, :class:`PTuneMixin` and the ``Distributed*`` model classes: prompt tuning over
  local blocks or a swarm;
- :func:`export_prompt`, :class:`PromptClassifier`: the best prompt taken out of MLflow, and used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_config": "ptune_search.config",
    "ConfigError": "ptune_search.config",
    "run_search": "ptune_search.search.driver",
    "PTuneConfig": "ptune_search.models.ptune",
    "PTuneMixin": "ptune_search.models.ptune",
    "DistributedLlamaConfig": "ptune_search.models",
    "DistributedLlamaForCausalLM": "ptune_search.models",
    "DistributedLlamaForSequenceClassification": "ptune_search.models",
    "DistributedLlamaModel": "ptune_search.models",
    "export_prompt": "ptune_search.prompts.export",
    "PromptClassifier": "ptune_search.prompts.predict",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
