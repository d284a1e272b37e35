"""Llama-family models whose transformer blocks run elsewhere: in-process or on a swarm of block servers.

The client holds the embeddings, the final norm, the head and the trainable prompts. The blocks are a
"block chain": any module mapping ``(hidden [B, T, H], attention_mask [B, T], deep_prompts)`` to hidden
states, either :class:`LlamaBlockSpan` over all blocks (``local_blocks=True``) or the swarm's
``RemoteBlockChain`` (``initial_peers=[...]``).

Example::

    config = AutoConfig.from_pretrained(path)
    config.num_labels = 5
    config.tuning_mode = "deep_ptune"
    config.pre_seq_len = 16
    model = DistributedLlamaForSequenceClassification.from_pretrained(path, config=config, local_blocks=True)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, LlamaConfig, PreTrainedConfig
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, SequenceClassifierOutput
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ptune_search.models.checkpoint import read_tensors
from ptune_search.models.llama.blocks import LlamaBlockSpan
from ptune_search.models.padding import RightPadding, last_token_index
from ptune_search.models.ptune import PTuneMixin, validate_ptune_settings


@strict
class DistributedLlamaConfig(LlamaConfig):
    """LlamaConfig plus prompt-tuning settings (see PTuneConfig) and how the client reaches the swarm."""

    pre_seq_len: int = 0
    tuning_mode: str | None = None
    initial_peers: list[str] | None = None
    dht_prefix: str | None = None
    request_timeout: float = 30.0
    max_retries: int = 5
    block_wait_timeout: float = 30.0

    @classmethod
    def from_any(cls, config: PreTrainedConfig) -> "DistributedLlamaConfig":
        """Accept the plain LlamaConfig that ``AutoConfig`` returns, keeping attributes the user set on it."""
        if isinstance(config, cls):
            return config
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"a Llama-family config is needed, got {type(config).__name__}")
        return cls.from_dict(config.to_dict())


class LoadableFromCheckpoint:
    """``from_pretrained`` for the distributed classes: client-side weights here, blocks local or remote."""

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: Optional[PreTrainedConfig] = None,
        *,
        local_blocks: bool = False,
        initial_peers: Optional[Sequence[str]] = None,
        dtype: torch.dtype = torch.float32,
        prompt: Optional[str | Path] = None,
        **config_overrides: Any,
    ):
        """Settings in ``config_overrides`` (e.g. ``tuning_mode="ptune"``) are set on the config first.

        ``prompt``: a folder written by ``ptune-search export``. Its tuning mode, prompt length and labels are
        set on the config, and its tensors loaded; a checkpoint other than the one it was tuned with, or an
        override that contradicts it, is refused before any block is loaded or any swarm is joined.
        """
        if prompt is None:
            return _load(cls, path, config, local_blocks, initial_peers, dtype, config_overrides)
        from ptune_search.prompts.prompt_folder import ExportedPrompt

        exported = ExportedPrompt.read(prompt)
        exported.check_settings(config_overrides)
        exported.check_checkpoint(path)
        settings = {**exported.manifest.config_settings(), **config_overrides}
        model = _load(cls, path, config, local_blocks, initial_peers, dtype, settings)
        exported.load_into(model, checkpoint_checked=True)
        return model

    def load_prompt(self, folder: str | Path) -> None:
        """Load an exported prompt (``ptune-search export``) into this model, built for the same settings.

        Refused with a clear error when the prompt was tuned on another checkpoint (fingerprint), another
        architecture, another tuning mode or prompt length, or (for a classifier) another number of labels.
        """
        from ptune_search.prompts.prompt_folder import ExportedPrompt

        ExportedPrompt.read(folder).load_into(self)


class DistributedLlamaModel(LoadableFromCheckpoint, PTuneMixin, nn.Module):
    """Embeddings -> [prompts] -> block chain -> final norm, with the prompt prefix dropped from the output.

    Batches may be padded left or right (the outputs equal); a mask row without tokens or with padding
    between tokens is refused.
    """

    def __init__(self, config: DistributedLlamaConfig, block_chain: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = block_chain
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)
        self.init_prompts(config)

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
        hidden = self.layers(hidden, attention_mask, deep_prompts)
        return BaseModelOutput(last_hidden_state=layout.restore(self.norm(hidden)[:, self.pre_seq_len :]))


class DistributedLlamaHeadModel(LoadableFromCheckpoint, nn.Module):
    """A head over :class:`DistributedLlamaModel`; ``trainable_head`` names the head module trained with the prompts."""

    trainable_head: Optional[str] = None

    def get_prompt(self, batch_size: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return self.model.get_prompt(batch_size)


class DistributedLlamaForCausalLM(DistributedLlamaHeadModel):
    """Language-model head over :class:`DistributedLlamaModel`; only the prompts are trainable."""

    def __init__(self, config: DistributedLlamaConfig, block_chain: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.model = DistributedLlamaModel(config, block_chain, dtype)
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


class DistributedLlamaForSequenceClassification(DistributedLlamaHeadModel):
    """Classifier that pools the last real token (left or right padding); prompts and ``score`` are trainable."""

    trainable_head = "score"

    def __init__(self, config: DistributedLlamaConfig, block_chain: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.model = DistributedLlamaModel(config, block_chain, dtype)
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


def _load(
    cls: type,
    path: str | Path,
    config: Optional[PreTrainedConfig],
    local_blocks: bool,
    initial_peers: Optional[Sequence[str]],
    dtype: torch.dtype,
    config_overrides: dict[str, Any],
) -> nn.Module:
    """Build ``cls`` with its block chain and load the client-side weights from the checkpoint at ``path``."""
    config = DistributedLlamaConfig.from_any(config if config is not None else AutoConfig.from_pretrained(path))
    for key, value in config_overrides.items():
        setattr(config, key, value)
    if initial_peers is not None:
        config.initial_peers = list(initial_peers)
    validate_ptune_settings(config.tuning_mode, config.pre_seq_len)
    if local_blocks and config.initial_peers:
        raise ValueError("pass either local_blocks=True or initial_peers=[...], not both")
    if local_blocks:
        block_chain = LlamaBlockSpan.from_checkpoint(path, config, 0, config.num_hidden_layers, dtype)
    elif config.initial_peers:
        from ptune_search.swarm.client.remote_chain import RemoteBlockChain

        block_chain = RemoteBlockChain.connect(config, dtype=dtype)
    else:
        raise ValueError(
            "where do the transformer blocks run? pass local_blocks=True to run them in this process, "
            "or initial_peers=[multiaddr, ...] to use a swarm of block servers"
        )
    model = cls(config, block_chain, dtype)
    _load_client_weights(model, path, dtype)
    _freeze_all_but_prompts_and_head(model)
    return model


def _load_client_weights(model: nn.Module, path: str | Path, dtype: torch.dtype) -> None:
    """Load every parameter outside the block chain; only prompts and new heads may be missing."""
    own_prefix = "model." if isinstance(model, DistributedLlamaModel) else ""
    client_names = {name for name in model.state_dict() if not name.startswith(("layers.", "model.layers."))}

    def wanted(name: str) -> Optional[str]:
        if name.startswith("model.layers."):
            return None
        own_name = name[len(own_prefix) :] if own_prefix and name.startswith(own_prefix) else name
        return own_name if own_name in client_names else None

    state = read_tensors(path, wanted)
    for name, tensor in state.items():
        target = model.get_parameter(name)
        state[name] = tensor.to(target.dtype)
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


def _freeze_all_but_prompts_and_head(model: nn.Module) -> None:
    model.requires_grad_(False)
    base = model if isinstance(model, DistributedLlamaModel) else model.model
    for name in ("prompt_embeddings", "intermediate_prompt_embeddings"):
        if hasattr(base, name):
            getattr(base, name).requires_grad_(True)
    head = getattr(model, "trainable_head", None)
    if head:
        getattr(model, head).requires_grad_(True)
