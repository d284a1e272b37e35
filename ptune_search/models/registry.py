"""Which model families run here, keyed by ``config.model_type``: each family is one folder of
``ptune_search.models`` whose ``FAMILY`` names its config, block span and client classes.

Block servers take their span class from here, clients their model classes, and the experiment config
refuses an unsupported checkpoint with :class:`UnsupportedModelError` before any process starts. Family
folders are imported only when asked for, so checking a model type costs no model code.

Example::

    from transformers import AutoConfig

    family = family_of("llama")  # the key is the checkpoint's config.model_type
    span = family.span_class.from_checkpoint(path, AutoConfig.from_pretrained(path), 0, 4)  # blocks 0..3
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Optional

FAMILY_MODULES = {
    model_type: f"ptune_search.models.{model_type}"
    for model_type in ("bloom", "falcon", "llama", "mistral", "mixtral", "qwen2", "qwen3")
}


class UnsupportedModelError(ValueError):
    """A checkpoint of a model type no family here runs."""

    def __init__(self, model_type: Optional[str], where: str):
        super().__init__(
            f"{where} holds a model of type {model_type!r}, which ptune-search does not support; "
            f"supported model types: {', '.join(supported_model_types())}"
        )


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """A family's client classes (``Distributed<Family>ForSequenceClassification`` and ``...ForCausalLM``);
    its model class names its config and block span classes. Typed loosely: this module imports no model
    code, the family folders import it."""

    classifier_class: type
    causal_lm_class: type

    @property
    def model_class(self) -> type:
        return self.classifier_class.base_class

    @property
    def config_class(self) -> type:
        return self.model_class.config_class

    @property
    def span_class(self) -> type:
        return self.model_class.span_class

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    @property
    def embedding_tensor(self) -> str:
        """The checkpoint name of the token embedding (what the model fingerprint hashes)."""
        return f"{self.model_class.checkpoint_names['embed_tokens']}.weight"


def supported_model_types() -> list[str]:
    return sorted(FAMILY_MODULES)


def family_of(model_type: Optional[str], where: str = "the checkpoint") -> ModelFamily:
    """The family of ``model_type``; :class:`UnsupportedModelError` (naming ``where``) for any other."""
    if model_type not in FAMILY_MODULES:
        raise UnsupportedModelError(model_type, where)
    return importlib.import_module(FAMILY_MODULES[model_type]).FAMILY


def checkpoint_model_type(path: str | Path) -> Optional[str]:
    """``model_type`` from a checkpoint folder's config.json, read without transformers."""
    config_file = Path(path) / "config.json"
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"cannot read the model type of {path}: {config_file} ({e})") from None


def check_supported(path: str | Path) -> str:
    """The model type of the checkpoint at ``path``, or :class:`UnsupportedModelError`."""
    model_type = checkpoint_model_type(path)
    if model_type not in FAMILY_MODULES:
        raise UnsupportedModelError(model_type, str(path))
    return model_type


class AutoDistributedModelForSequenceClassification:
    """Picks the family's ``Distributed<Family>ForSequenceClassification`` from the checkpoint's model type.

    Example::

        model = AutoDistributedModelForSequenceClassification.from_pretrained(
            path, num_labels=5, tuning_mode="ptune", pre_seq_len=8, initial_peers=initial_peers
        )
    """

    @staticmethod
    def from_pretrained(path: str | Path, config: Optional[Any] = None, **kwargs: Any):
        model_type = config.model_type if config is not None else checkpoint_model_type(path)
        return family_of(model_type, str(path)).classifier_class.from_pretrained(path, config, **kwargs)


class AutoDistributedModelForCausalLM:
    """Picks the family's ``Distributed<Family>ForCausalLM`` from the checkpoint's model type.

    Example::

        import torch

        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=initial_peers)
        ids = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=16)
    """

    @staticmethod
    def from_pretrained(path: str | Path, config: Optional[Any] = None, **kwargs: Any):
        model_type = config.model_type if config is not None else checkpoint_model_type(path)
        return family_of(model_type, str(path)).causal_lm_class.from_pretrained(path, config, **kwargs)
