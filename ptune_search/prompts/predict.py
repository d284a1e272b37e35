"""Classifying texts with an exported prompt, through a swarm or on local blocks.

The texts are tokenized as in training (``data.encode_texts``, with the manifest's max length and template),
run through the model with the prompt and head, and each comes back with every label and its probability, most
likely first::

    with PromptClassifier("best-prompt", local_blocks=True) as classifier:
        for prediction in classifier.classify(["Shares rose sharply on Friday ..."]):
            print(prediction.label, prediction.probabilities)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch

from ptune_search.data import encode_texts
from ptune_search.models.prompt_folder import ExportedPrompt


@dataclasses.dataclass(frozen=True)
class Prediction:
    text: str
    probabilities: dict[str, float]  # every label, most likely first

    @property
    def label(self) -> str:
        return next(iter(self.probabilities))


class PromptClassifier:
    """An exported prompt loaded onto its model, ready to classify texts.

    Args:
        prompt: a folder written by ``ptune-search export``.
        model_path: the checkpoint folder (default: the manifest's ``model_path``, or its model alias prepared
            on this machine); its fingerprint must match the manifest's.
        local_blocks: run the transformer blocks in this process.
        initial_peers: run them on the swarm these peers belong to.
        peers_file: or read those peers from this file (one multiaddr a line, as ``swarm local`` writes it).
        dht_prefix: the swarm's name for the model, when it is not the checkpoint folder's name.
        batch_size: texts per forward pass.
    """

    def __init__(
        self,
        prompt: str | Path,
        *,
        model_path: Optional[str | Path] = None,
        local_blocks: bool = False,
        initial_peers: Optional[Sequence[str]] = None,
        peers_file: Optional[str | Path] = None,
        dht_prefix: Optional[str] = None,
        batch_size: int = 8,
    ):
        from transformers import AutoTokenizer

        from ptune_search.models.registry import AutoDistributedModelForSequenceClassification

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        if peers_file is not None:
            initial_peers = _read_peers(Path(peers_file))
        manifest = ExportedPrompt.read(prompt).manifest
        self.manifest = manifest
        self.batch_size = batch_size
        path = Path(model_path) if model_path is not None else _model_path(manifest.model_path, manifest.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        overrides = {"dht_prefix": dht_prefix} if dht_prefix else {}
        self.model = AutoDistributedModelForSequenceClassification.from_pretrained(
            path,
            prompt=prompt,
            local_blocks=local_blocks,
            initial_peers=list(initial_peers) if initial_peers else None,
            **overrides,
        )
        self.model.eval()

    def __enter__(self) -> "PromptClassifier":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.model.close()

    def classify(self, texts: Iterable[str]) -> Iterator[Prediction]:
        """Predictions in the order of ``texts``, computed ``batch_size`` texts at a time."""
        batch: list[str] = []
        for number, text in enumerate(texts, start=1):
            if not text.strip():
                raise ValueError(f"text {number} is empty; every text needs at least one non-blank character")
            batch.append(text)
            if len(batch) == self.batch_size:
                yield from self._classify_batch(batch)
                batch = []
        if batch:
            yield from self._classify_batch(batch)

    @torch.no_grad()
    def _classify_batch(self, texts: list[str]) -> list[Prediction]:
        settings = self.manifest.tokenizer
        input_ids, attention_mask = encode_texts(texts, self.tokenizer, settings.max_length, settings.template)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        probabilities = torch.softmax(logits.float(), dim=-1)
        predictions = []
        for text, row in zip(texts, probabilities.tolist()):
            ranked = sorted(zip(self.manifest.label_names, row), key=lambda pair: -pair[1])
            predictions.append(Prediction(text, dict(ranked)))
        return predictions


def _read_peers(path: Path) -> list[str]:
    from ptune_search.swarm.launcher import read_peers_file

    peers = read_peers_file(path) if path.is_file() else []
    if not peers:
        raise FileNotFoundError(
            f"no peer multiaddrs in {path}; wait until the swarm writes it (`ptune-search swarm local ... "
            f"--peers-file {path}` does once every block is online) or pass --initial-peers"
        )
    return peers


def _model_path(exported_from: str, model: str) -> Path:
    """The folder the prompt was exported from, or else its model alias prepared here."""
    from ptune_search.pretrained import MODEL_ALIASES, resolve_model

    if (Path(exported_from) / "config.json").is_file():
        return Path(exported_from)
    if model in MODEL_ALIASES:
        return resolve_model(model)
    raise FileNotFoundError(
        f"the prompt's model {exported_from} is not on this machine; pass its checkpoint folder with --model"
    )


def read_texts(file: str | Path) -> list[str]:
    """One text per non-blank line of ``file`` (``-``: standard input)."""
    import sys

    if str(file) == "-":
        lines = sys.stdin.read().splitlines()
    else:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"no file {path} to read texts from; give a file with one text per line")
        lines = path.read_text(encoding="utf-8").splitlines()
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"{file} holds no text; write one text per line")
    return texts


def format_prediction(prediction: Prediction, as_json: bool = False) -> str:
    """``{"text", "label", "probabilities"}`` as one JSON line, or the text and one ``label  p`` line per label."""
    import json

    if as_json:
        record = {"text": prediction.text, "label": prediction.label, "probabilities": prediction.probabilities}
        return json.dumps(record)
    shown = prediction.text if len(prediction.text) <= 80 else prediction.text[:77] + "..."
    width = max(len(label) for label in prediction.probabilities)
    rows = [f"  {label:<{width}}  {probability:.4f}" for label, probability in prediction.probabilities.items()]
    return "\n".join([shown, *rows])
