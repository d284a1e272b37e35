"""A short identity of a checkpoint: its family, the architecture it declares and the exact bytes of its
token embedding.

A prompt is tuned against one model, and only there does it mean anything; servers and clients of a swarm
must hold the same one. ``model_fingerprint(path)`` is ``<model_type>/sha256:<hex>``, the family followed by
the sha256 of the canonical JSON of

* the config fields that fix the architecture (``ARCHITECTURE_FIELDS``: sizes, layer and head counts,
  vocabulary, activation, norm epsilon, rope settings, tied embeddings, what a family adds: experts,
  sliding windows, Falcon's block layout), and
* the dtype, shape and raw stored bytes of the token embedding (``model.embed_tokens.weight``, or where
  the family keeps it), read straight from its safetensors file (the one weight every client loads, and one
  that differs between any two trainings or seeds).

It costs one read of the embedding (113 MB, about 0.2 s, for SmolLM2-135M) and no other weights; moving or
renaming the folder keeps it, re-saving the weights in another dtype changes it.

Example::

    model_fingerprint(path)   # 'llama/sha256:9f2c...' for a checkpoint folder
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from ptune_search.models.checkpoint import checkpoint_files
from ptune_search.models.registry import family_of

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
    "layer_norm_epsilon",
    "sliding_window",
    "layer_types",
    "num_local_experts",
    "num_experts_per_tok",
    "new_decoder_architecture",
    "parallel_attn",
    "num_kv_heads",
    "multi_query",
    "alibi",
    "bias",
    "apply_residual_connection_post_layernorm",
)
_CHUNK = 8 << 20


def architecture_of(config: Any) -> dict[str, Any]:
    """The architecture fields of a transformers config (missing ones are None), JSON-able."""
    return {field: _jsonable(getattr(config, field, None)) for field in ARCHITECTURE_FIELDS}


def model_fingerprint(path: str | Path) -> str:
    """``<model_type>/sha256:<hex>`` of the checkpoint folder ``path`` (see the module docstring)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    embedding = family_of(config.model_type, str(path)).embedding_tensor
    payload = {"architecture": architecture_of(config), "embed_tokens": embedding_digest(path, embedding)}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return f"{config.model_type}/sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def embedding_digest(path: str | Path, tensor: str) -> str:
    """sha256 of the embedding ``tensor``'s dtype, shape and stored bytes, read without loading any tensor."""
    files = checkpoint_files(path)
    if tensor not in files:
        raise ValueError(f"checkpoint {path} has no {tensor}; is its config.json from another checkpoint?")
    file = files[tensor]
    with open(file, "rb") as stream:
        header_size = struct.unpack("<Q", stream.read(8))[0]
        entry = json.loads(stream.read(header_size))[tensor]
        begin, end = entry["data_offsets"]
        digest = hashlib.sha256(f"{entry['dtype']}{entry['shape']}".encode())
        stream.seek(8 + header_size + begin)
        remaining = end - begin
        while remaining > 0:
            chunk = stream.read(min(_CHUNK, remaining))
            if not chunk:
                raise ValueError(f"{file} is truncated inside {tensor}; re-create the checkpoint")
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))
