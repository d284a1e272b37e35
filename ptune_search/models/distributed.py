"""Models whose transformer blocks run elsewhere, in-process or on a swarm of block servers: the parts every
family shares.

The client holds the embeddings, the final norm, the head and the trainable prompts. The blocks are a
"block chain": any module mapping ``(hidden [B, T, H], attention_mask [B, T], deep_prompts)`` to hidden
states, either the family's :class:`~ptune_search.models.decoder_span.DecoderBlockSpan` over all blocks
(``local_blocks=True``) or the swarm's ``RemoteBlockChain`` (``initial_peers=[...]``). A family subclasses
:class:`DistributedModel` (its norms and checkpoint names) and names it in thin head classes.

Example::

    from ptune_search.models import DistributedLlamaForSequenceClassification

    model = DistributedLlamaForSequenceClassification.from_pretrained(
        path, num_labels=5, tuning_mode="deep_ptune", pre_seq_len=16, local_blocks=True
    )
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PreTrainedConfig
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, SequenceClassifierOutput

from ptune_search.models.checkpoint import read_tensors
from ptune_search.models.decoder_span import DecoderBlockSpan
from ptune_search.models.fingerprint import model_fingerprint
from ptune_search.models.generation import CausalLMSession, generate
from ptune_search.models.padding import RightPadding, last_token_index
from ptune_search.models.ptune import PTuneMixin, validate_ptune_settings
from ptune_search.swarm.client.client_config import ClientConfig


class LoadableFromCheckpoint:
    """``from_pretrained`` for the distributed classes: client-side weights here, blocks local or remote."""

    base_class: ClassVar[type["DistributedModel"]]

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: Optional[PreTrainedConfig] = None,
        *,
        local_blocks: bool = False,
        dtype: torch.dtype = torch.float32,
        prompt: Optional[str | Path] = None,
        **settings: Any,
    ):
        """``settings`` are fields of the family's config (``tuning_mode="ptune"``, ``request_timeout=10.0``,
        ``initial_peers=[...]``, ``num_labels=5``...), applied over ``config`` or the checkpoint's own.

        ``prompt``: a folder written by ``ptune-search export``, or a PEFT prompt-tuning adapter (then the
        checkpoint is checked by hidden size only: PEFT records no fingerprint). Its tuning mode, prompt length
        and labels are set on the config, and its tensors loaded; a checkpoint other than the one it was tuned
        with, or a setting that contradicts it, is refused before any block is loaded or any swarm is joined.
        """
        if prompt is None:
            return _load(cls, path, config, local_blocks, dtype, settings)
        from ptune_search.models.peft_adapter import PeftPromptAdapter, is_peft_adapter
        from ptune_search.models.prompt_folder import ExportedPrompt

        exported = PeftPromptAdapter.read(prompt) if is_peft_adapter(prompt) else ExportedPrompt.read(prompt)
        exported.check_settings(settings)
        exported.check_checkpoint(path)
        model = _load(cls, path, config, local_blocks, dtype, {**exported.config_settings(), **settings})
        exported.load_into(model, checkpoint_checked=True)
        return model

    def rebuilt(self, **settings: Any):
        """This model built again under other ``settings`` (tuning mode, prompt length, labels...), as
        ``from_pretrained`` would build it, on the same block chain and frozen weights: nothing is read from
        disk and the swarm is not joined again (a search trial actor takes up its next trial with it).

        Prompts and head are new, drawn from torch's generator in the same order as ``from_pretrained``
        draws them, so under the same seed they equal a fresh model's. The two models share their blocks:
        use only the new one. Settings of the block chain (the swarm client's) cannot change here.
        """
        config = distributed_config(self.base_class, self.config._name_or_path, self.config, settings)
        changed = sorted(
            field.name
            for field in dataclasses.fields(ClientConfig)
            if getattr(config, field.name) != getattr(self.config, field.name)
        )
        if changed:
            raise ValueError(
                f"rebuilt() keeps the block chain, so it cannot change its settings {changed}; "
                "load the model again with from_pretrained to change them"
            )
        base = self.base_model
        model = type(self)(config, base.layers, base.dtype)
        trained = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        frozen = {
            name: tensor
            for name, tensor in self.state_dict().items()
            if name not in trained and not name.startswith(("layers.", "model.layers."))  # the chain is shared
        }
        model.load_state_dict(frozen, strict=False, assign=True)  # shares the tensors: no copy
        _freeze_all_but_prompts_and_head(model)
        return model

    def load_prompt(self, folder: str | Path) -> None:
        """Load an exported prompt (``ptune-search export``) into this model, built for the same settings.

        Refused with a clear error when the prompt was tuned on another checkpoint (fingerprint), another
        architecture, another tuning mode or prompt length, or (for a classifier) another number of labels.
        """
        from ptune_search.models.prompt_folder import ExportedPrompt

        ExportedPrompt.read(folder).load_into(self)

    def close(self) -> None:
        """Leave the swarm (a no-op with local blocks); the model cannot run its blocks afterwards."""
        close = getattr(self.base_model.layers, "close", None)
        if close is not None:
            close()

    @property
    def base_model(self) -> "DistributedModel":
        return self if isinstance(self, DistributedModel) else self.model


class DistributedModel(LoadableFromCheckpoint, PTuneMixin, nn.Module):
    """Embeddings -> [prompts] -> block chain -> final norm, with the prompt prefix dropped from the output.

    A family sets ``config_class``, ``span_class`` and ``norm_class`` (an RMSNorm taking ``rms_norm_eps``),
    and ``checkpoint_names`` (the checkpoint's names of the client's modules) if they differ from Llama's.
    Families with LayerNorms override :meth:`make_norm`; those whose embeddings are normalised before the first
    block (Bloom) :meth:`make_input_norm`. Prompts are prepended before that norm, as a model fed them as
    input embeddings would do.

    Batches may be padded left or right (the outputs equal); a mask row without tokens or with padding
    between tokens is refused.
    """

    config_class: ClassVar[type[PreTrainedConfig]]
    span_class: ClassVar[type[DecoderBlockSpan]]
    norm_class: ClassVar[type[nn.Module]]
    checkpoint_names: ClassVar[dict[str, str]] = {"embed_tokens": "model.embed_tokens", "norm": "model.norm"}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.base_class = cls

    def __init__(self, config: PreTrainedConfig, block_chain: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.input_norm = self.make_input_norm(config)
        if self.input_norm is not None:
            self.input_norm.to(dtype)
        self.layers = block_chain
        self.norm = self.make_norm(config).to(dtype)
        self.init_prompts(config)

    @classmethod
    def make_norm(cls, config: PreTrainedConfig) -> nn.Module:
        return cls.norm_class(config.hidden_size, eps=config.rms_norm_eps)

    @classmethod
    def make_input_norm(cls, config: PreTrainedConfig) -> Optional[nn.Module]:
        return None

    @classmethod
    def check_config(cls, config: PreTrainedConfig) -> None:
        """Raise ValueError for a checkpoint of the family that this folder cannot run (most run them all)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
    ) -> BaseModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.to(self.dtype)
        batch, length = hidden.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=hidden.device)
        if attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the inputs {(batch, length)}")
        layout = RightPadding.of(attention_mask)  # left-padded rows run with their tokens first
        hidden, attention_mask = layout.apply(hidden), layout.mask
        prompts, deep_prompts = self.get_prompt(batch)
        if prompts is not None:
            hidden = torch.cat([prompts.to(hidden.dtype), hidden], dim=1)
            prefix_mask = torch.ones(batch, self.pre_seq_len, dtype=attention_mask.dtype, device=hidden.device)
            attention_mask = torch.cat([prefix_mask, attention_mask], dim=1)
        if self.input_norm is not None:
            hidden = self.input_norm(hidden)
        hidden = self.layers(hidden, attention_mask, deep_prompts)
        return BaseModelOutput(last_hidden_state=layout.restore(self.norm(hidden)[:, self.pre_seq_len :]))


class DistributedHeadModel(LoadableFromCheckpoint, nn.Module):
    """A head over a family's :class:`DistributedModel` (``base_class``); ``trainable_head`` names the head
    module trained with the prompts."""

    trainable_head: ClassVar[Optional[str]] = None

    def get_prompt(self, batch_size: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return self.model.get_prompt(batch_size)


class DistributedForCausalLM(DistributedHeadModel):
    """Language-model head over the family's model; only the prompts are trainable."""

    def __init__(self, config: PreTrainedConfig, block_chain: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.model = self.base_class(config, block_chain, dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> CausalLMOutput:
        hidden = self.model(input_ids, attention_mask, inputs_embeds).last_hidden_state
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def inference_session(self, max_length: int, batch_size: int = 1) -> CausalLMSession:
        """A context manager for step-by-step generation of at most ``max_length`` tokens per row (input
        included); the prompt prefix is reserved on top. See :mod:`ptune_search.models.generation`."""
        return CausalLMSession(self, batch_size, max_length)

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **options: Any):
        """Hugging Face's ``generate`` conventions over this model's blocks, local or remote (options:
        :func:`ptune_search.models.generation.generate`)."""
        return generate(self, input_ids, attention_mask, **options)


class DistributedForSequenceClassification(DistributedHeadModel):
    """Classifier that pools the last real token (left or right padding); prompts and ``score`` are trainable."""

    trainable_head = "score"

    def __init__(self, config: PreTrainedConfig, block_chain: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.model = self.base_class(config, block_chain, dtype)
        # float32 like the prompts: the head is trained, and bf16 updates of it would be lost.
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False, dtype=torch.float32)
        nn.init.normal_(self.score.weight, std=config.initializer_range)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> SequenceClassifierOutput:
        hidden = self.model(input_ids, attention_mask, inputs_embeds).last_hidden_state
        if attention_mask is None:
            last_token = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
        else:
            last_token = last_token_index(attention_mask)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token]
        logits = self.score(pooled.float())
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def distributed_config(
    family: type[DistributedModel], path: str | Path, config: Optional[PreTrainedConfig], settings: dict[str, Any]
) -> PreTrainedConfig:
    """The family's config from ``config`` (or the checkpoint's) with ``settings`` applied; unknown settings,
    unusable prompt-tuning settings and a checkpoint of another family are refused here."""
    config_class = family.config_class
    base = config if config is not None else AutoConfig.from_pretrained(path)
    if base.model_type != config_class.model_type:
        raise ValueError(
            f"{path} holds a {base.model_type!r} model, not {config_class.model_type!r}; "
            "use AutoDistributedModelForSequenceClassification to pick the family from the checkpoint"
        )
    fields = base.to_dict()
    if "num_labels" in settings:  # the checkpoint's label map (2 labels unless it says) would contradict it
        fields.pop("id2label", None)
        fields.pop("label2id", None)
    resolved, unused = config_class.from_dict(fields, return_unused_kwargs=True, **settings)
    if unused:
        raise TypeError(f"unknown settings {sorted(unused)}: not fields of {config_class.__name__}")
    validate_ptune_settings(resolved.tuning_mode, resolved.pre_seq_len)
    resolved._name_or_path = resolved._name_or_path or str(path)  # a config class's own from_pretrained drops it
    family.check_config(resolved)
    return resolved


def _load(
    cls: type[LoadableFromCheckpoint],
    path: str | Path,
    config: Optional[PreTrainedConfig],
    local_blocks: bool,
    dtype: torch.dtype,
    settings: dict[str, Any],
) -> nn.Module:
    """Build ``cls`` with its block chain and load the client-side weights from the checkpoint at ``path``."""
    family = cls.base_class
    config = distributed_config(family, path, config, settings)
    if local_blocks and config.initial_peers:
        raise ValueError("pass either local_blocks=True or initial_peers=[...], not both")
    if local_blocks:
        block_chain = family.span_class.from_checkpoint(path, config, 0, config.num_hidden_layers, dtype)
    elif config.initial_peers:
        from ptune_search.swarm.client.remote_chain import RemoteBlockChain
        from ptune_search.swarm.protocol import ServedModel

        served = ServedModel(config.model_type, model_fingerprint(path))
        block_chain = RemoteBlockChain.connect(config, model=served)
    else:
        raise ValueError(
            "where do the transformer blocks run? pass local_blocks=True to run them in this process, "
            "or initial_peers=[multiaddr, ...] to use a swarm of block servers"
        )
    try:
        model = cls(config, block_chain, dtype)
        _load_client_weights(model, path)
    except BaseException:
        getattr(block_chain, "close", lambda: None)()  # leave the swarm: nobody else holds the connection
        raise
    _freeze_all_but_prompts_and_head(model)
    return model


def _load_client_weights(model: LoadableFromCheckpoint, path: str | Path) -> None:
    """Load every parameter outside the block chain; only prompts and new heads may be missing."""
    own_prefix = "" if isinstance(model, DistributedModel) else "model."
    names = model.base_class.checkpoint_names
    client_names = {name for name in model.state_dict() if not name.startswith(("layers.", "model.layers."))}
    by_checkpoint_name = {}
    for name in client_names:
        module, _, rest = name[len(own_prefix) :].partition(".") if name.startswith(own_prefix) else ("", "", "")
        checkpoint_name = f"{names[module]}.{rest}" if module in names else name
        by_checkpoint_name[checkpoint_name] = name
    state = read_tensors(path, by_checkpoint_name.get)
    for name, tensor in state.items():
        state[name] = tensor.to(model.get_parameter(name).dtype)
    missing = client_names - set(state)
    allowed = [re.compile(pattern) for pattern in PTuneMixin._keys_to_ignore_on_load_missing]
    head = getattr(model, "trainable_head", None)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    unexpected_missing = sorted(
        name
        for name in missing - tied
        if not any(p.search(name) for p in allowed) and not (head and name.startswith(f"{head}."))
    )
    if unexpected_missing:
        raise ValueError(f"checkpoint {path} lacks weights the client needs: {unexpected_missing}")
    model.load_state_dict(state, strict=False)


def _freeze_all_but_prompts_and_head(model: LoadableFromCheckpoint) -> None:
    model.requires_grad_(False)
    for name in ("prompt_embeddings", "intermediate_prompt_embeddings"):
        if hasattr(model.base_model, name):
            getattr(model.base_model, name).requires_grad_(True)
    head = getattr(model, "trainable_head", None)
    if head:
        getattr(model, head).requires_grad_(True)
