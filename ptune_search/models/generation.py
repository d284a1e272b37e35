"""Text generation with a causal LM whose blocks keep their attention caches in an inference session.

:class:`CausalLMSession` feeds token ids to the model a few at a time: its first step puts the prompt prefix
(``ptune``: prompt embeddings before the tokens; ``deep_ptune``: also each block's deep prompts, added to the
prefix positions) in front of the tokens, in the first ``pre_seq_len`` positions of every block's cache, so
later steps send only the new tokens. The blocks run wherever the model's run them: a
:class:`~ptune_search.models.session_cache.LocalBlocksSession` for local blocks, a session on each block
server of a route for a swarm. :func:`generate` follows Hugging Face's conventions (``max_new_tokens``, eos,
greedy or seeded sampling with ``temperature``/``top_k``/``top_p``, left padding) and returns the input ids
followed by the new tokens, finished rows padded with ``pad_token_id``.

Example::

    from ptune_search.models.llama.model import DistributedLlamaForCausalLM

    model = DistributedLlamaForCausalLM.from_pretrained(path, local_blocks=True)
    input_ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # left padding
    ids = model.generate(input_ids, attention_mask=mask, max_new_tokens=16)  # greedy, [B, T + 16] at most
    with model.inference_session(max_length=32) as session:  # step by step, batch 1
        logits = session.step(input_ids[1:])  # [1, T, vocab]
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

import torch
from torch import nn


class BlocksSession(Protocol):
    """What a block chain's ``inference_session(batch_size, max_length, pre_seq_len)`` returns (``pre_seq_len``:
    the prefix the deep prompts are added to, 0 without them)."""

    def step(
        self, hidden: torch.Tensor, step_mask: torch.Tensor, deep_prompts: Optional[torch.Tensor] = None
    ) -> torch.Tensor: ...

    def close(self) -> None: ...


class CausalLMSession:
    """Token ids in, next-token logits out, for ``batch_size`` rows of at most ``max_length`` tokens in all."""

    def __init__(self, model: nn.Module, batch_size: int, max_length: int):
        """``model``: a ``Distributed<Family>ForCausalLM``, its blocks local or on a swarm."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (got {max_length})")
        base = model.model
        self.model, self.batch_size, self.max_length = model, batch_size, max_length
        self.pre_seq_len = base.pre_seq_len
        self.position = 0  # tokens fed so far, the prompt prefix not counted
        deep_prefix = self.pre_seq_len if base.tuning_mode == "deep_ptune" else 0
        self.blocks: BlocksSession = base.layers.inference_session(
            batch_size=batch_size, max_length=self.pre_seq_len + max_length, pre_seq_len=deep_prefix
        )

    @torch.no_grad()
    def step(
        self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """Logits ``[B, t, vocab]`` (float32) of the next token after each of the ``t`` new tokens ``input_ids``;
        with ``logits_to_keep`` k > 0, after the last k only (``[B, k, vocab]``: the LM head skips the others)."""
        base = self.model.model
        batch, length = input_ids.shape
        if batch != self.batch_size:
            raise ValueError(f"the session was opened for batch size {self.batch_size}, got a batch of {batch}")
        if self.position + length > self.max_length:
            raise ValueError(
                f"{length} more tokens after {self.position} exceed the session's max_length {self.max_length}; "
                "open the session with a larger max_length"
            )
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long)
        hidden = base.embed_tokens(input_ids)
        prefix, deep_prompts = 0, None
        if self.position == 0:
            prompts, deep_prompts = base.get_prompt(batch)
            if prompts is not None:
                prefix = prompts.shape[1]
                hidden = torch.cat([prompts.to(hidden.dtype), hidden], dim=1)
                attention_mask = torch.cat([torch.ones(batch, prefix, dtype=attention_mask.dtype), attention_mask], 1)
        if base.input_norm is not None:
            hidden = base.input_norm(hidden)
        hidden = self.blocks.step(hidden, attention_mask.to(torch.long), deep_prompts)
        self.position += length
        hidden = hidden[:, prefix:] if logits_to_keep <= 0 else hidden[:, -min(logits_to_keep, length) :]
        return self.model.lm_head(base.norm(hidden)).float()

    def close(self) -> None:
        self.blocks.close()

    def __enter__(self) -> "CausalLMSession":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int | Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    session: Optional[CausalLMSession] = None,
) -> torch.Tensor:
    """``input_ids`` ``[B, T]`` (left-padded) followed by up to ``max_new_tokens`` new tokens of ``model``
    (a ``Distributed<Family>ForCausalLM``).

    Greedy unless ``do_sample``; sampling draws from torch's global generator (``torch.manual_seed``), as
    Hugging Face's does. A row stops at an eos token and is padded after it; generation stops when all rows
    have. ``session``: continue an open :class:`CausalLMSession` (``input_ids`` are then the tokens after
    those it holds); by default one is opened for this call and closed after it.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {list(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if attention_mask is not None and not bool((attention_mask[:, -1] == 1).all()):
        raise ValueError(
            "generate() needs left padding: every row's last position must be a token (tokenizer.padding_side = 'left')"
        )
    config = model.config
    eos = _token_set(eos_token_id if eos_token_id is not None else config.eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    batch = input_ids.shape[0]
    own_session = session is None
    if session is None:
        session = CausalLMSession(model, batch, input_ids.shape[1] + max_new_tokens)
    try:
        logits = session.step(input_ids, attention_mask, logits_to_keep=1)[:, -1]
        unfinished = torch.ones(batch, dtype=torch.bool)
        new_tokens: list[torch.Tensor] = []
        while True:
            scores = _warped(logits, temperature, top_k, top_p) if do_sample else logits
            if do_sample:
                tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = scores.argmax(dim=-1)
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_token_id))
            new_tokens.append(tokens)
            if eos:
                unfinished &= ~torch.isin(tokens, torch.tensor(eos))
            if len(new_tokens) == max_new_tokens or not bool(unfinished.any()):
                break
            logits = session.step(tokens[:, None], logits_to_keep=1)[:, -1]
    finally:
        if own_session:
            session.close()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def _token_set(tokens: Optional[int | Sequence[int]]) -> list[int]:
    if tokens is None:
        return []
    return [int(tokens)] if isinstance(tokens, int) else [int(token) for token in tokens]


def _warped(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """Scores to sample from, processed in Hugging Face's order: temperature, then top-k, then top-p."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); for greedy decoding pass do_sample=False")
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k is not None and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores
