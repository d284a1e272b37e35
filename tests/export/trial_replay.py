"""A trial's final evaluation recomputed from its MLflow records, the way the trial itself evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ptune_search.data import TaskData, TaskSpec, load_task
from ptune_search.pretrained import resolve_model
from ptune_search.search.trial import build_classifier, ptune_config_of
from ptune_search.training.steps import Evaluation, evaluate


def search_task(client: MlflowClient, parent_run_id: str, scratch: Path) -> tuple[Path, TaskData, dict]:
    """The search's model path, its tokenized task (same split as the trials) and its config."""
    config = yaml.safe_load(Path(client.download_artifacts(parent_run_id, "config.yaml", str(scratch))).read_text())
    model_path = resolve_model(config["model"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    task = config["task"]
    data = load_task(
        TaskSpec(task["name"], task["text_column"], task["label_column"]),
        tokenizer,
        task["max_length"],
        task["train_size"],
        task["validation_size"],
        config["seed"],
    )
    return model_path, data, config


def replay_final_evaluation(client: MlflowClient, run_id: str, scratch: Path) -> Evaluation:
    """Local blocks, the run's logged prompt and head, ``training.evaluate`` on the validation split."""
    run = client.get_run(run_id)
    model_path, data, config = search_task(client, run.data.tags["mlflow.parentRunId"], scratch)
    files = {
        name: Path(client.download_artifacts(run_id, name, str(scratch)))
        for name in ("prompt.safetensors", "head.safetensors", "ptune_config.json")
    }
    ptune = ptune_config_of(json.loads(files["ptune_config.json"].read_text()))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = build_classifier(str(model_path), data.num_labels, tokenizer.pad_token_id, ptune, None)
    tensors = {**load_file(files["prompt.safetensors"]), **load_file(files["head.safetensors"])}
    assert not model.load_state_dict(tensors, strict=False).unexpected_keys
    return evaluate(model, data.validation, config["budget"]["batch_size"])
