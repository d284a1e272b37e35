"""Read selected tensors of a Hugging Face safetensors checkpoint without touching the others.

Block servers load only their span and clients only their local parts, so nobody ever materializes
weights it does not run: safetensors reads tensors lazily, one name at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name of the checkpoint at ``path`` to the safetensors file that holds it."""
    folder = Path(path)
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        with safe_open(folder / SINGLE_FILE, framework="pt") as f:
            return {name: folder / SINGLE_FILE for name in f.keys()}
    raise FileNotFoundError(
        f"no safetensors checkpoint in {folder} (expected {SINGLE_FILE} or {INDEX_FILE}); "
        "prepare one with `ptune-search prepare-model` or `save_pretrained(..., safe_serialization=True)`"
    )


def read_tensors(
    path: str | Path, wanted: Callable[[str], Optional[str]], dtype: Optional[torch.dtype] = None
) -> dict[str, torch.Tensor]:
    """Load the tensors for which ``wanted(name)`` returns a new name; the rest stay on disk."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, file in checkpoint_files(path).items():
        new_name = wanted(name)
        if new_name is not None:
            by_file.setdefault(file, []).append((name, new_name))
    tensors = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name, new_name in names:
                tensor = f.get_tensor(name)
                tensors[new_name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return tensors
