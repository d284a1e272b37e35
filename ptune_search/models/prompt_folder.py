"""The folder an exported prompt lives in: what it holds, how it is read back, and which models accept it.

A folder written by ``ptune-search export`` holds::

    manifest.json        PromptManifest: model identity, prompt settings, labels, tokenizer, metric, source runs
    prompt.safetensors   model.prompt_embeddings.weight [P, H] (and for deep_ptune
                         model.intermediate_prompt_embeddings.weight [P * L, H]); empty for a head-only run
    head.safetensors     score.weight [num_labels, H]

Tensor names are those of ``DistributedLlamaForSequenceClassification``. Reading checks every file against
the sha256 the manifest lists and every tensor against the manifest's shapes, so a truncated or edited
folder is refused before any model is touched. A model accepts the prompt only if its checkpoint has the
manifest's fingerprint (see :mod:`ptune_search.models.fingerprint`) and it was built for the same tuning
mode, prompt length and number of labels::

    model = DistributedLlamaForSequenceClassification.from_pretrained(path, prompt="best-prompt", local_blocks=True)
    model.load_prompt("best-prompt")   # again, or into any model built for the same settings
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

if TYPE_CHECKING:
    import torch
    from torch import nn

MANIFEST_FILE = "manifest.json"
PROMPT_FILE = "prompt.safetensors"  # also in trial checkpoints and MLflow artifacts, under the same name
HEAD_FILE = "head.safetensors"
PTUNE_CONFIG_FILE = "ptune_config.json"  # a trial's tuning settings; an exported folder has its manifest instead
TRIAL_ARTIFACTS = (PROMPT_FILE, HEAD_FILE, PTUNE_CONFIG_FILE)  # what each trial's MLflow run holds
FORMAT_VERSION = 1
SHALLOW_KEY = "model.prompt_embeddings.weight"
DEEP_KEY = "model.intermediate_prompt_embeddings.weight"
HEAD_KEY = "score.weight"

PositiveInt = Annotated[StrictInt, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


class TokenizerSettings(_Strict):
    """How the texts were tokenized in training; inference does the same."""

    max_length: PositiveInt
    padding_side: Literal["left", "right"] = "right"
    truncation_side: Literal["left", "right"] = "right"
    pad_token: Optional[StrictStr] = None
    pad_token_id: Optional[StrictInt] = None
    template: StrictStr = "{text}"  # the text around each input ({text}); the text is cut, never the template


class MetricValue(_Strict):
    """The metric the run was chosen by, and its final logged value and step."""

    name: StrictStr
    mode: Literal["max", "min"]
    value: Optional[StrictFloat] = None
    step: Optional[StrictInt] = None


class PromptManifest(_Strict):
    """``manifest.json``: everything needed to load the prompt again and to trace where it came from."""

    format_version: Literal[1] = FORMAT_VERSION
    model: StrictStr  # as the search named it: a model alias or a checkpoint folder
    model_path: StrictStr  # the checkpoint folder the export read
    model_fingerprint: StrictStr
    model_type: StrictStr = "llama"  # the family (config.model_type); exports before families were Llama
    hidden_size: PositiveInt
    num_hidden_layers: PositiveInt
    tuning_mode: Optional[Literal["ptune", "deep_ptune"]]
    pre_seq_len: Annotated[StrictInt, Field(ge=0)]
    label_names: Annotated[list[StrictStr], Field(min_length=2)]
    tokenizer: TokenizerSettings
    metric: MetricValue
    source_run_id: StrictStr
    parent_run_id: StrictStr
    files: dict[StrictStr, StrictStr]  # file name -> sha256 hex
    source: dict[StrictStr, Any] = Field(default_factory=dict)  # experiment, tracking URI, trial id, lr, task, time

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def prompt_shapes(self) -> dict[str, tuple[int, int]]:
        """The tensors ``prompt.safetensors`` must hold, by name."""
        if self.tuning_mode is None:
            return {}
        shapes = {SHALLOW_KEY: (self.pre_seq_len, self.hidden_size)}
        if self.tuning_mode == "deep_ptune":
            shapes[DEEP_KEY] = (self.pre_seq_len * self.num_hidden_layers, self.hidden_size)
        return shapes

    def config_settings(self) -> dict[str, Any]:
        """Model config values the prompt needs (``from_pretrained(..., prompt=DIR)`` sets them)."""
        settings: dict[str, Any] = {
            "tuning_mode": self.tuning_mode,
            "pre_seq_len": self.pre_seq_len,
            "id2label": dict(enumerate(self.label_names)),
            "label2id": {name: index for index, name in enumerate(self.label_names)},
        }
        if self.tokenizer.pad_token_id is not None:
            settings["pad_token_id"] = self.tokenizer.pad_token_id
        return settings


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: PromptManifest) -> None:
    (folder / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")


@dataclasses.dataclass(frozen=True)
class ExportedPrompt:
    """An exported prompt read from its folder and checked; see the module docstring."""

    folder: Path
    manifest: PromptManifest
    prompt: dict[str, "torch.Tensor"]
    head: dict[str, "torch.Tensor"]

    @classmethod
    def read(cls, folder: str | Path) -> "ExportedPrompt":
        folder = Path(folder)
        if not folder.is_dir():
            problem = "is not a folder" if folder.exists() else "does not exist"
            raise FileNotFoundError(
                f"exported prompt {folder} {problem}; write one with `ptune-search export ... --out {folder}`"
            )
        manifest = _read_manifest(folder)
        for name, sha256 in manifest.files.items():
            _check_file(folder, name, sha256)
        for required in (PROMPT_FILE, HEAD_FILE):
            if required not in manifest.files:
                raise ValueError(f"{folder / MANIFEST_FILE} lists no {required}; export the prompt again")
        prompt = _read_tensors(folder / PROMPT_FILE, manifest.prompt_shapes())
        head = _read_tensors(folder / HEAD_FILE, {HEAD_KEY: (manifest.num_labels, manifest.hidden_size)})
        return cls(folder, manifest, prompt, head)

    def config_settings(self) -> dict[str, Any]:
        return self.manifest.config_settings()

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Refuse explicit model settings (``tuning_mode=...``, ...) that contradict the prompt."""
        wanted = {
            "tuning_mode": self.manifest.tuning_mode,
            "pre_seq_len": self.manifest.pre_seq_len,
            "num_labels": self.manifest.num_labels,
        }
        for key, value in settings.items():
            if key in wanted and value != wanted[key]:
                raise ValueError(
                    f"{key}={value!r} contradicts the exported prompt {self.folder} ({key}={wanted[key]!r}); "
                    f"drop {key}=... and the prompt's own setting is used"
                )

    def check_checkpoint(self, path: str | Path) -> None:
        """Refuse a checkpoint folder other than the one the prompt was tuned with (by fingerprint)."""
        from transformers import AutoConfig

        from ptune_search.models.fingerprint import model_fingerprint

        self._check_architecture(AutoConfig.from_pretrained(path), f"checkpoint {path}")
        fingerprint = model_fingerprint(path)
        if fingerprint != self.manifest.model_fingerprint:
            raise ValueError(
                f"exported prompt {self.folder} was tuned on model {self.manifest.model!r} with fingerprint "
                f"{self.manifest.model_fingerprint}, but checkpoint {path} has fingerprint {fingerprint}: "
                f"other weights or another model; load it with the model it was tuned with "
                f"(exported from {self.manifest.model_path})"
            )

    def check_model(self, model: "nn.Module") -> None:
        """Refuse a model built for another architecture, tuning mode, prompt length or label count."""
        self._check_architecture(model.config, f"this {type(model).__name__}")
        base = _base_model(model)
        built = (base.tuning_mode, base.pre_seq_len)
        manifest = self.manifest
        if built != (manifest.tuning_mode, manifest.pre_seq_len):
            raise ValueError(
                f"exported prompt {self.folder} has tuning_mode={manifest.tuning_mode!r}, "
                f"pre_seq_len={manifest.pre_seq_len}, but this model was built with tuning_mode={built[0]!r}, "
                f"pre_seq_len={built[1]}; build it with from_pretrained(path, prompt={str(self.folder)!r}) "
                "to take the prompt's settings"
            )
        if _is_classifier(model) and model.num_labels != manifest.num_labels:
            raise ValueError(
                f"exported prompt {self.folder} classifies into {manifest.num_labels} labels "
                f"{manifest.label_names}, but this model has num_labels={model.num_labels}; "
                f"build it with from_pretrained(path, prompt={str(self.folder)!r})"
            )

    def load_into(self, model: "nn.Module", *, checkpoint_checked: bool = False) -> None:
        """Check ``model`` (and, unless already done, its checkpoint), then copy the prompt (and head) in.

        A classifier takes the head and the label names too; a causal LM or a bare model only the prompt.
        """
        self.check_model(model)
        if not checkpoint_checked:
            self.check_checkpoint(_checkpoint_path(model, self.folder))
        state = dict(self.prompt)
        if _base_model(model) is model:  # a bare model: its prompts are not under ``model.``
            state = {name.removeprefix("model."): tensor for name, tensor in state.items()}
        if _is_classifier(model):
            state.update(self.head)
            model.config.id2label = self.manifest.config_settings()["id2label"]
            model.config.label2id = self.manifest.config_settings()["label2id"]
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"exported prompt {self.folder} holds tensors this model lacks: {unexpected}")

    def _check_architecture(self, config: Any, what: str) -> None:
        manifest = self.manifest
        if config.model_type != manifest.model_type:
            raise ValueError(
                f"exported prompt {self.folder} was tuned on a {manifest.model_type} model ({manifest.model!r}), "
                f"but {what} is a {config.model_type} model; use the model it was tuned with ({manifest.model_path})"
            )
        found = (config.hidden_size, config.num_hidden_layers)
        if found != (manifest.hidden_size, manifest.num_hidden_layers):
            raise ValueError(
                f"exported prompt {self.folder} was tuned on model {manifest.model!r} with hidden_size "
                f"{manifest.hidden_size} and {manifest.num_hidden_layers} layers, but {what} has hidden_size "
                f"{found[0]} and {found[1]} layers; use the model it was tuned with ({manifest.model_path})"
            )


def _read_manifest(folder: Path) -> PromptManifest:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST_FILE}: not an exported prompt (see `ptune-search export`)")
    try:
        return PromptManifest.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); export the prompt again") from None
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in error.errors())
        raise ValueError(f"{path} is not a valid prompt manifest ({problems}); export the prompt again") from None


def _check_file(folder: Path, name: str, sha256: str) -> None:
    path = folder / name
    if Path(name).name != name:
        raise ValueError(f"{folder / MANIFEST_FILE} lists {name!r}, which is not a plain file name")
    if not path.is_file():
        raise FileNotFoundError(f"exported prompt {folder} lacks {name}; export the prompt again")
    if file_sha256(path) != sha256:
        raise ValueError(
            f"{path} is damaged: its sha256 differs from the one in {MANIFEST_FILE} (truncated or modified); "
            "export the prompt again"
        )


def _read_tensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, "torch.Tensor"]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); export the prompt again") from None
    if set(tensors) != set(shapes):
        raise ValueError(f"{path} holds {sorted(tensors)}, but its manifest needs {sorted(shapes)}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape or not tensors[name].is_floating_point():
            raise ValueError(
                f"{path}: {name} is {tensors[name].dtype} {tuple(tensors[name].shape)}, the manifest needs a "
                f"float tensor of shape {shape}"
            )
    return tensors


def _base_model(model: "nn.Module") -> "nn.Module":
    """The module holding the prompts: a head model's ``model``, or a bare model itself (by shape, not by
    class, so that this format stays free of model imports and serves every family)."""
    return getattr(model, "model", model)


def _is_classifier(model: "nn.Module") -> bool:
    """A sequence classifier trains its head with the prompt, and takes the head and labels of an export."""
    return getattr(model, "trainable_head", None) is not None


def _checkpoint_path(model: "nn.Module", folder: Path) -> str:
    path = getattr(model.config, "_name_or_path", "")
    if not path or not Path(path).is_dir():
        raise ValueError(
            f"cannot check that exported prompt {folder} fits this model: its config names no checkpoint "
            f"folder ({path!r}); build the model with from_pretrained(checkpoint_folder, prompt={str(folder)!r})"
        )
    return str(path)
