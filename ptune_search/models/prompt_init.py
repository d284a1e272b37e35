"""Where a prompt starts: rows copied from token embeddings instead of noise (Lester et al., 2021).

An init is a step applied to a model after it is built (``PTuneMixin.init_prompts`` keeps its random
rows), so a model's construction stays the same whatever the init:

* ``random``: the rows ``init_prompts`` drew (normal, std ``initializer_range``);
* ``vocab``: the embeddings of tokens sampled (seeded, without replacement) among the ``VOCAB_POOL``
  most frequent tokens of the training texts;
* ``labels``: the embeddings of the class names' tokens, in label order, repeated to ``pre_seq_len`` rows;
* ``text:<words>``: the embeddings of the given text's tokens, repeated to ``pre_seq_len`` rows.

Only the shallow prompt (``prompt_embeddings``) is initialised; the deep rows of ``deep_ptune``
(``intermediate_prompt_embeddings``) start at zero in every init, so a fresh deep prompt is the shallow
one plus per-block offsets that training learns.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ptune_search.models.ptune import PTuneMixin

PROMPT_INITS = ("random", "vocab", "labels")
TEXT_PREFIX = "text:"
VOCAB_POOL = 5000  # Lester et al. sample from the 5,000 most common tokens


def check_prompt_init(init: str) -> str:
    """``init`` if it names an init, else a ValueError naming the choices."""
    if init in PROMPT_INITS or (init.startswith(TEXT_PREFIX) and init[len(TEXT_PREFIX) :].strip()):
        return init
    raise ValueError(f"prompt init {init!r} is not one of {', '.join(PROMPT_INITS)} or text:<words> (non-empty)")


def initial_prompt_tokens(
    init: str,
    pre_seq_len: int,
    tokenizer: PreTrainedTokenizerBase,
    label_names: Sequence[str],
    train_input_ids: torch.Tensor,
    train_attention_mask: torch.Tensor,
    seed: int,
) -> list[int] | None:
    """The token ids whose embeddings become the prompt's rows, or None for ``random``."""
    check_prompt_init(init)
    if init == "random":
        return None
    if init == "vocab":
        counts = Counter(train_input_ids[train_attention_mask.bool()].tolist())
        special = set(tokenizer.all_special_ids)
        pool = [token for token, _ in counts.most_common() if token not in special][:VOCAB_POOL]
        if len(pool) < pre_seq_len:
            raise ValueError(
                f"prompt init 'vocab' needs {pre_seq_len} distinct tokens in the training texts, found {len(pool)}"
            )
        return random.Random(seed).sample(pool, pre_seq_len)
    words = [f" {name}" for name in label_names] if init == "labels" else [" " + init[len(TEXT_PREFIX) :].strip()]
    tokens = [token for word in words for token in tokenizer(word, add_special_tokens=False)["input_ids"]]
    return [tokens[index % len(tokens)] for index in range(pre_seq_len)]


@torch.no_grad()
def apply_prompt_init(model: PTuneMixin, token_ids: list[int] | None) -> None:
    """Copy the embeddings of ``token_ids`` into the shallow prompt rows (None: keep the random rows)."""
    if token_ids is None or not model.tuning_mode:
        return
    if len(token_ids) != model.pre_seq_len:
        raise ValueError(f"{len(token_ids)} init tokens for a prompt of {model.pre_seq_len} rows")
    rows = model.embed_tokens.weight[torch.tensor(token_ids)].float()
    model.prompt_embeddings.weight.copy_(rows)
