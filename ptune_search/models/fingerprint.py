"""A short identity of a checkpoint: the architecture it declares and the exact bytes of its token embedding.

A prompt is tuned against one model, and only there does it mean anything. ``model_fingerprint(path)``
hashes (sha256) the canonical JSON of

* the config fields that fix the architecture (``ARCHITECTURE_FIELDS``: sizes, layer and head counts,
  vocabulary, activation, norm epsilon, rope settings, tied embeddings), and
* the dtype, shape and raw stored bytes of the token embedding ``model.embed_tokens.weight``, read
  straight from its safetensors file (the one weight every client loads, and one that differs between
  any two trainings or seeds).

It costs one read of the embedding (113 MB, about 0.2 s, for SmolLM2-135M) and no other weights; moving or
renaming the folder keeps it, re-saving the weights in another dtype changes it.

Example::

    model_fingerprint(path)   # 'sha256:9f2c...' for a checkpoint folder
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from ptune_search.models.checkpoint import checkpoint_files

EMBEDDING_TENSOR = "model.embed_tokens.weight"
ARCHITECTURE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)
_CHUNK = 8 << 20


def architecture_of(config: Any) -> dict[str, Any]:
    """The architecture fields of a transformers config (missing ones are None), JSON-able."""
    return {field: _jsonable(getattr(config, field, None)) for field in ARCHITECTURE_FIELDS}


def model_fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of the checkpoint folder ``path`` (see the module docstring)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    payload = {"architecture": architecture_of(config), "embed_tokens": embedding_digest(path)}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def embedding_digest(path: str | Path) -> str:
    """sha256 of the embedding's dtype, shape and stored bytes, read without loading any tensor."""
    files = checkpoint_files(path)
    if EMBEDDING_TENSOR not in files:
        raise ValueError(f"checkpoint {path} has no {EMBEDDING_TENSOR}; is it a Llama-family checkpoint?")
    file = files[EMBEDDING_TENSOR]
    with open(file, "rb") as stream:
        header_size = struct.unpack("<Q", stream.read(8))[0]
        entry = json.loads(stream.read(header_size))[EMBEDDING_TENSOR]
        begin, end = entry["data_offsets"]
        digest = hashlib.sha256(f"{entry['dtype']}{entry['shape']}".encode())
        stream.seek(8 + header_size + begin)
        remaining = end - begin
        while remaining > 0:
            chunk = stream.read(min(_CHUNK, remaining))
            if not chunk:
                raise ValueError(f"{file} is truncated inside {EMBEDDING_TENSOR}; re-create the checkpoint")
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))
