"""A prompt folder written straight from a model (no search): random prompt and head, a real manifest."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer

from ptune_search.data import TEXT_SLOT, prepare_tokenizer
from ptune_search.models.fingerprint import model_fingerprint
from ptune_search.models.prompt_folder import (
    DEEP_KEY,
    HEAD_FILE,
    HEAD_KEY,
    PROMPT_FILE,
    SHALLOW_KEY,
    MetricValue,
    PromptManifest,
    TokenizerSettings,
    file_sha256,
    write_manifest,
)

LABELS = ["business", "entertainment", "politics", "sport", "tech"]


def handmade_prompt(
    model_path: Path, folder: Path, tuning_mode: str, pre_seq_len: int, seed: int = 0, template: str = TEXT_SLOT
) -> Path:
    """A prompt folder for ``model_path`` whose prompt and head are random (scaled like trained ones)."""
    generator = torch.Generator().manual_seed(seed)
    config = AutoConfig.from_pretrained(model_path)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    prompt = {SHALLOW_KEY: torch.randn(pre_seq_len, hidden, generator=generator) * 0.5}
    if tuning_mode == "deep_ptune":
        prompt[DEEP_KEY] = torch.randn(pre_seq_len * layers, hidden, generator=generator) * 0.5
    head = {HEAD_KEY: torch.randn(len(LABELS), hidden, generator=generator) * 0.2}
    folder.mkdir(parents=True)
    save_file(prompt, folder / PROMPT_FILE)
    save_file(head, folder / HEAD_FILE)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prepare_tokenizer(tokenizer)
    manifest = PromptManifest(
        model=str(model_path),
        model_path=str(model_path),
        model_fingerprint=model_fingerprint(model_path),
        hidden_size=hidden,
        num_hidden_layers=layers,
        tuning_mode=tuning_mode,
        pre_seq_len=pre_seq_len,
        label_names=LABELS,
        tokenizer=TokenizerSettings(
            max_length=32,
            padding_side=tokenizer.padding_side,
            truncation_side=tokenizer.truncation_side,
            pad_token=tokenizer.pad_token,
            pad_token_id=tokenizer.pad_token_id,
            template=template,
        ),
        metric=MetricValue(name="val_accuracy", mode="max"),
        source_run_id="handmade",
        parent_run_id="handmade",
        files={name: file_sha256(folder / name) for name in (PROMPT_FILE, HEAD_FILE)},
    )
    write_manifest(folder, manifest)
    return folder
