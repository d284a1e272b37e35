"""Label words: a classifier head made of the LM head's rows for one word per class (a verbalizer).

Scored at the position the classifier reads, a class's logit is then what the causal LM gives the class's word
as the next token ("...This article is about" -> " sports"), so an untrained classifier already uses what the
model knows. The head stays a plain ``score`` layer: it trains, exports and serves like any other head. With
tied embeddings (SmolLM2, Bloom, Falcon) the rows are input embeddings the client already holds; otherwise
they are read from the checkpoint's ``lm_head.weight``, and only those rows are kept.

A word of several tokens is scored by its first token, the one the LM must put first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from ptune_search.models.checkpoint import read_tensors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ptune_search.models.distributed import DistributedForSequenceClassification

LM_HEAD = "lm_head.weight"


def label_words(label_names: Sequence[str], chosen: Mapping[str, str]) -> list[str]:
    """Each class's word: ``chosen[name]``, or the class name after a space (how it follows a word in text)."""
    unknown = sorted(set(chosen) - set(label_names))
    if unknown:
        raise ValueError(f"label words are given for {unknown}, which are not classes of the task ({label_names})")
    return [chosen.get(name, f" {name}") for name in label_names]


def label_word_tokens(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[int]:
    """The first token of each word; two classes whose words start with the same token are refused."""
    tokens = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"label word {word!r} has no tokens; give each class a word")
        tokens.append(ids[0])
    if len(set(tokens)) < len(tokens):
        shared = [word for word, token in zip(words, tokens) if tokens.count(token) > 1]
        raise ValueError(f"label words {shared} start with the same token; give those classes other words")
    return tokens


@torch.no_grad()
def apply_label_word_head(model: DistributedForSequenceClassification, token_ids: Sequence[int]) -> None:
    """Set ``model.score`` to the LM head's rows of ``token_ids``, one per class in label order."""
    if len(token_ids) != model.score.out_features:
        raise ValueError(f"{len(token_ids)} label words for a head of {model.score.out_features} classes")
    index = torch.tensor(list(token_ids))
    if model.config.tie_word_embeddings:
        rows = model.model.embed_tokens.weight[index]
    else:
        path = model.config._name_or_path
        rows = read_tensors(path, lambda name: name if name == LM_HEAD else None)[LM_HEAD][index]
    model.score.weight.copy_(rows.float())
