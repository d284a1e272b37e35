"""PEFT interop: a ``ptune`` prompt as a PEFT prompt-tuning adapter, and a PEFT adapter loaded as a prompt.

PEFT's prompt tuning for sequence classification (``PeftModelForSequenceClassification``) prepends the
virtual-token embeddings to the input embeddings, extends the attention mask with ones in front, and runs
the base model on ``inputs_embeds``: the same computation as ``tuning_mode="ptune"`` here (the prefix takes
positions 0..P-1, the tokens follow). The head (``score``) travels as a module PEFT saves whole
(``modules_to_save``). An adapter folder holds::

    adapter_config.json          PromptTuningConfig: SEQ_CLS, num_virtual_tokens = pre_seq_len, token_dim = hidden
    adapter_model.safetensors    prompt_embeddings [P, H], base_model.score.weight [num_labels, H]
    ptune_manifest.json          the exported prompt's manifest (labels, tokenizer settings, source runs)

Load it with the checkpoint the prompt was tuned on, built for the prompt's labels::

    labels = json.load(open(f"{DIR}/ptune_manifest.json"))["label_names"]
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
    model = PeftModel.from_pretrained(base, DIR)

One difference PEFT brings: Hugging Face's classifier cannot see padding in ``inputs_embeds``, so it pools the
batch's last position; padded texts in a batch are pooled on padding. Classify one text at a time (or a batch
of equal lengths) through PEFT; the logits then equal ours.

A search's template (the text around each input, ``search_space.template``) has no place in PEFT's format
either: ``ptune_manifest.json`` keeps it, and texts given to PEFT must be put in it first
(``ptune_search.data.encode_texts`` does so).

``deep_ptune`` adds a prompt to every block's input, which PEFT's prompt tuning has no place for (its prefix
tuning feeds keys and values, not block inputs): it is refused. The reverse direction reads a PEFT
prompt-tuning adapter trained elsewhere: ``from_pretrained(path, prompt=ADAPTER_DIR)``. Writing an adapter from
a search's records is :func:`ptune_search.prompts.export.export_peft_adapter`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ptune_search.models.prompt_folder import HEAD_KEY, MANIFEST_FILE, SHALLOW_KEY, ExportedPrompt

if TYPE_CHECKING:
    import torch
    from torch import nn

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PTUNE_MANIFEST_FILE = "ptune_manifest.json"
PEFT_PROMPT_KEY = "prompt_embeddings"
PEFT_HEAD_KEY = "base_model.score.weight"  # modules_to_save's name for the classifier's `score`
DEEP_PTUNE_REFUSAL = (
    "deep_ptune has no PEFT equivalent: it adds a trained prompt to the input of every transformer block, "
    "and PEFT's prompt tuning only prepends virtual tokens to the input embeddings (its prefix tuning feeds "
    "attention keys and values instead); export it in the ptune format (--format ptune)"
)


def check_peft_compatible(prompt: ExportedPrompt) -> None:
    if prompt.manifest.tuning_mode == "deep_ptune":
        raise ValueError(f"{prompt.folder}: {DEEP_PTUNE_REFUSAL}")
    if prompt.manifest.tuning_mode is None:
        raise ValueError(
            f"{prompt.folder} is a head-only run (no prompt): a PEFT prompt-tuning adapter needs at least one "
            "virtual token; export a trial run with tuning_mode ptune"
        )


def write_peft_adapter(prompt: ExportedPrompt, folder: Path) -> None:
    """Write ``prompt`` (a ``ptune`` prompt) as a PEFT prompt-tuning adapter in ``folder``."""
    from peft import PromptTuningConfig, TaskType
    from safetensors.torch import save_file
    from transformers import AutoConfig

    check_peft_compatible(prompt)
    manifest = prompt.manifest
    model_config = AutoConfig.from_pretrained(manifest.model_path)
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_CLS,
        num_virtual_tokens=manifest.pre_seq_len,
        token_dim=manifest.hidden_size,
        num_transformer_submodules=1,
        num_attention_heads=model_config.num_attention_heads,
        num_layers=manifest.num_hidden_layers,
        base_model_name_or_path=manifest.model_path,
        modules_to_save=["score"],
        inference_mode=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors = {
        PEFT_PROMPT_KEY: prompt.prompt[SHALLOW_KEY].float().contiguous(),
        PEFT_HEAD_KEY: prompt.head[HEAD_KEY].float().contiguous(),
    }
    save_file(tensors, str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / PTUNE_MANIFEST_FILE).write_text((prompt.folder / MANIFEST_FILE).read_text())


def is_peft_adapter(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG_FILE).is_file() and not (folder / MANIFEST_FILE).is_file()


@dataclasses.dataclass(frozen=True)
class PeftPromptAdapter:
    """A PEFT prompt-tuning adapter read as a ``ptune`` prompt (and head, when it saved one).

    It answers the questions ``from_pretrained(..., prompt=...)`` asks an exported prompt: the settings the
    model needs, whether a checkpoint fits (hidden size; PEFT records no fingerprint), and loading.
    """

    folder: Path
    pre_seq_len: int
    token_dim: int
    prompt: "torch.Tensor"
    head: Optional["torch.Tensor"]
    label_names: Optional[list[str]]

    @classmethod
    def read(cls, folder: str | Path) -> "PeftPromptAdapter":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
        kind = (config.get("peft_type"), config.get("num_transformer_submodules", 1))
        if kind != ("PROMPT_TUNING", 1):
            raise ValueError(
                f"{folder} is a PEFT {config.get('peft_type')} adapter with {kind[1]} transformer submodules; only "
                "prompt tuning (PROMPT_TUNING) of a decoder (1 submodule) maps to tuning_mode='ptune'"
            )
        weights = folder / ADAPTER_WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"PEFT adapter {folder} lacks {ADAPTER_WEIGHTS_FILE}; save it again")
        tensors = load_file(weights)
        prompt = tensors.get(PEFT_PROMPT_KEY)
        shape = (config["num_virtual_tokens"], config["token_dim"])
        if prompt is None or tuple(prompt.shape) != shape:
            found = None if prompt is None else tuple(prompt.shape)
            raise ValueError(f"{weights}: {PEFT_PROMPT_KEY} is {found}, its adapter_config needs {shape}")
        head = tensors.get(PEFT_HEAD_KEY)
        labels = None
        if (folder / PTUNE_MANIFEST_FILE).is_file():
            labels = json.loads((folder / PTUNE_MANIFEST_FILE).read_text()).get("label_names")
        return cls(folder, shape[0], shape[1], prompt.float(), None if head is None else head.float(), labels)

    def config_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"tuning_mode": "ptune", "pre_seq_len": self.pre_seq_len}
        if self.head is not None:
            names = self.label_names or [f"LABEL_{index}" for index in range(self.head.shape[0])]
            settings["id2label"] = dict(enumerate(names))
            settings["label2id"] = {name: index for index, name in enumerate(names)}
        return settings

    def check_settings(self, settings: dict[str, Any]) -> None:
        wanted = {"tuning_mode": "ptune", "pre_seq_len": self.pre_seq_len}
        if self.head is not None:
            wanted["num_labels"] = int(self.head.shape[0])
        for key, value in settings.items():
            if key in wanted and value != wanted[key]:
                raise ValueError(
                    f"{key}={value!r} contradicts the PEFT adapter {self.folder} ({key}={wanted[key]!r}); "
                    f"drop {key}=... and the adapter's own setting is used"
                )

    def check_checkpoint(self, path: str | Path) -> None:
        from transformers import AutoConfig

        hidden = AutoConfig.from_pretrained(path).hidden_size
        if hidden != self.token_dim:
            raise ValueError(
                f"PEFT adapter {self.folder} has {self.token_dim}-wide virtual tokens, but checkpoint {path} has "
                f"hidden_size {hidden}; load it with the model it was trained for"
            )

    def load_into(self, model: "nn.Module", *, checkpoint_checked: bool = False) -> None:
        """Copy the prompt (and a saved head, into a classifier) in; models are told apart by their shape, not
        their class, as :mod:`~ptune_search.models.prompt_folder` does, so every family takes an adapter."""
        base = getattr(model, "model", model)
        if (base.tuning_mode, base.pre_seq_len) != ("ptune", self.pre_seq_len):
            raise ValueError(
                f"PEFT adapter {self.folder} is a ptune prompt of {self.pre_seq_len} tokens, but this model was "
                f"built with tuning_mode={base.tuning_mode!r}, pre_seq_len={base.pre_seq_len}; build it with "
                f"from_pretrained(path, prompt={str(self.folder)!r})"
            )
        base.prompt_embeddings.weight.data.copy_(self.prompt)
        if self.head is not None and getattr(model, "trainable_head", None) is not None:
            if tuple(model.score.weight.shape) != tuple(self.head.shape):
                raise ValueError(
                    f"PEFT adapter {self.folder} has a head of {self.head.shape[0]} labels, this model has "
                    f"{model.num_labels}; build it with from_pretrained(path, prompt={str(self.folder)!r})"
                )
            model.score.weight.data.copy_(self.head)
