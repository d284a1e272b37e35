"""Best-prompt export and inference: one tiny search, exported, loaded back and used; bad input refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from ptune_search.data import TaskSpec, load_examples
from ptune_search.models import DistributedLlamaForSequenceClassification
from ptune_search.models.fingerprint import model_fingerprint
from ptune_search.models.prompt_folder import HEAD_FILE, MANIFEST_FILE, PROMPT_FILE, PTUNE_CONFIG_FILE, ExportedPrompt
from ptune_search.models.registry import AutoDistributedModelForSequenceClassification
from ptune_search.prompts.export import EXPORTED_TO_TAG, ExportResult, export_prompt
from ptune_search.prompts.predict import PromptClassifier, format_prediction
from ptune_search.search.tracking.records import ROLE_TAG
from ptune_search.tiny_llama import make_tiny_llama
from ptune_search.training.steps import evaluate
from tests.export.fake_stores import stalled_and_broken_store
from tests.export.trial_replay import replay_final_evaluation, search_task
from tests.models.tiny_families import make_tiny_checkpoint
from tests.search.search_process import REPO

pytestmark = pytest.mark.slow

TEXTS = ["Shares in the bank fell sharply after its profit warning.", "The striker scored twice in the cup final."]


@pytest.fixture(scope="session")
def tracking_uri(search_output: Path) -> str:
    return f"sqlite:///{search_output / 'mlflow.db'}"


@pytest.fixture(scope="session")
def exported(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    return export_prompt(tracking_uri, tmp_path_factory.mktemp("exports") / "best", experiment="tiny")


@pytest.fixture
def prompt_copy(exported: ExportResult, tmp_path: Path) -> Path:
    """A copy of the export that a test may damage."""
    return Path(shutil.copytree(exported.folder, tmp_path / "prompt"))


def _finished_trials(tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tiny").experiment_id
    trials = client.search_runs([experiment], f"tags.`{ROLE_TAG}` = 'trial'")
    return [run for run in trials if run.info.status == "FINISHED"]


def test_export_writes_the_best_finished_trial_with_its_manifest(exported: ExportResult, tracking_uri: str):
    finished = _finished_trials(tracking_uri)
    best_accuracy = max(run.data.metrics["val_accuracy"] for run in finished)
    source = MlflowClient(tracking_uri).get_run(exported.manifest.source_run_id)
    manifest = exported.manifest

    assert source.info.status == "FINISHED" and source.data.tags[ROLE_TAG] == "trial"
    assert manifest.metric.name == "val_accuracy"
    assert manifest.metric.value == best_accuracy == source.data.metrics["val_accuracy"]
    assert manifest.metric.step == int(source.data.params["max_steps"])
    assert manifest.parent_run_id == source.data.tags["mlflow.parentRunId"]
    assert manifest.tuning_mode == source.data.params["tuning_mode"]
    assert str(manifest.pre_seq_len) == source.data.params["pre_seq_len"]
    assert manifest.label_names == load_examples(TaskSpec("bbc_news")).label_names
    assert (manifest.tokenizer.max_length, manifest.tokenizer.padding_side) == (32, "right")
    assert manifest.model == "tiny-llama" and manifest.model_fingerprint == model_fingerprint(manifest.model_path)
    assert manifest.model_type == "llama" and manifest.model_fingerprint.startswith("llama/sha256:")
    assert sorted(p.name for p in exported.folder.iterdir()) == sorted([MANIFEST_FILE, PROMPT_FILE, HEAD_FILE])


def test_export_tags_the_exported_run(tracking_uri: str, exported: ExportResult, tmp_path: Path):
    again = export_prompt(tracking_uri, tmp_path / "again", experiment="tiny")
    run = MlflowClient(tracking_uri).get_run(again.manifest.source_run_id)
    assert again.manifest.source_run_id == exported.manifest.source_run_id
    assert run.data.tags[EXPORTED_TO_TAG] == str(tmp_path / "again")


def test_loaded_prompt_reproduces_the_best_trials_final_evaluation(
    exported: ExportResult, tracking_uri: str, tmp_path: Path
):
    client = MlflowClient(tracking_uri)
    manifest = exported.manifest
    trial = replay_final_evaluation(client, manifest.source_run_id, tmp_path)
    model_path, data, config = search_task(client, manifest.parent_run_id, tmp_path)

    model = DistributedLlamaForSequenceClassification.from_pretrained(
        model_path, prompt=exported.folder, local_blocks=True
    )
    loaded = evaluate(model, data.validation, config["budget"]["batch_size"])

    assert (loaded.logits - trial.logits).abs().max().item() <= 1e-5
    assert loaded.accuracy == pytest.approx(manifest.metric.value, abs=1e-7)
    logged = client.get_run(manifest.source_run_id).data.metrics["val_accuracy"]
    assert loaded.accuracy == pytest.approx(logged, abs=1e-7)
    assert model.config.id2label == dict(enumerate(manifest.label_names))


def test_load_prompt_fills_a_model_built_for_the_same_settings(exported: ExportResult):
    manifest = exported.manifest
    reference = DistributedLlamaForSequenceClassification.from_pretrained(
        manifest.model_path, prompt=exported.folder, local_blocks=True
    )
    model = DistributedLlamaForSequenceClassification.from_pretrained(
        manifest.model_path,
        local_blocks=True,
        tuning_mode=manifest.tuning_mode,
        pre_seq_len=manifest.pre_seq_len,
        num_labels=manifest.num_labels,
    )
    model.load_prompt(exported.folder)
    batch = {"input_ids": torch.randint(0, 256, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    assert torch.equal(model(**batch).logits, reference(**batch).logits)


def test_predict_ranks_every_label_and_matches_the_loaded_model(exported: ExportResult):
    manifest = exported.manifest
    with PromptClassifier(exported.folder, local_blocks=True) as classifier:
        predictions = list(classifier.classify(TEXTS))
        encoded = classifier.tokenizer(TEXTS, truncation=True, max_length=32, padding="longest", return_tensors="pt")
        expected = torch.softmax(classifier.model(**encoded).logits, dim=-1)

    for prediction, row in zip(predictions, expected):
        probabilities = list(prediction.probabilities.values())
        assert sorted(prediction.probabilities) == sorted(manifest.label_names)
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) == pytest.approx(1.0)
        for label, probability in prediction.probabilities.items():
            assert probability == pytest.approx(row[manifest.label_names.index(label)].item(), abs=1e-6)
    line = json.loads(format_prediction(predictions[0], as_json=True))
    assert line == {"text": TEXTS[0], "label": predictions[0].label, "probabilities": predictions[0].probabilities}


def test_predict_through_a_swarm_matches_local_blocks(exported: ExportResult):
    from tests.swarm.swarm_testing import SwarmRegistry

    with PromptClassifier(exported.folder, local_blocks=True) as classifier:
        local = list(classifier.classify(TEXTS))
    swarms = SwarmRegistry()
    try:
        swarm = swarms.start(Path(exported.manifest.model_path), servers=2)
        with PromptClassifier(exported.folder, initial_peers=swarm.initial_peers) as classifier:
            remote = list(classifier.classify(TEXTS))
    finally:
        swarms.stop_all()
    for here, there in zip(local, remote):
        assert here.text == there.text
        for label, probability in here.probabilities.items():
            assert there.probabilities[label] == pytest.approx(probability, abs=1e-5)


def test_cli_exports_then_predicts_json_lines(tracking_uri: str, exported: ExportResult, tmp_path: Path):
    cli = [sys.executable, "-m", "ptune_search.cli"]
    out = tmp_path / "cli-best"
    done = subprocess.run(
        [*cli, "export", "--tracking-uri", tracking_uri, "--experiment", "tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["source_run_id"] == exported.manifest.source_run_id
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(TEXTS) + "\n\n")
    predict = [*cli, "predict", "--prompt", str(out), "--file", str(texts_file), "--local-blocks", "--json"]
    done = subprocess.run(predict, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["text"] for line in lines] == TEXTS
    assert all(set(line["probabilities"]) == set(exported.manifest.label_names) for line in lines)


# Bad input: each refused with an error that names the problem.


def test_a_missing_prompt_folder_is_refused(tmp_path: Path, exported: ExportResult):
    with pytest.raises(FileNotFoundError, match="does not exist; write one with `ptune-search export"):
        DistributedLlamaForSequenceClassification.from_pretrained(
            exported.manifest.model_path, prompt=tmp_path / "nowhere", local_blocks=True
        )


@pytest.mark.parametrize("manifest_updated", [False, True], ids=["as-exported", "manifest-rehashed"])
def test_a_truncated_safetensors_file_is_refused(prompt_copy: Path, manifest_updated: bool):
    from ptune_search.models.prompt_folder import file_sha256

    prompt_file = prompt_copy / PROMPT_FILE
    prompt_file.write_bytes(prompt_file.read_bytes()[: prompt_file.stat().st_size // 2])
    if manifest_updated:  # even a manifest that agrees with the damage does not make the file readable
        manifest = json.loads((prompt_copy / MANIFEST_FILE).read_text())
        manifest["files"][PROMPT_FILE] = file_sha256(prompt_file)
        (prompt_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    problem = "not a readable safetensors file" if manifest_updated else "is damaged: its sha256 differs"
    with pytest.raises(ValueError, match=problem):
        ExportedPrompt.read(prompt_copy)


@pytest.mark.parametrize(
    ("other_model", "problem"),
    [
        ({"seed": 1}, "fingerprint"),
        ({"hidden_size": 32}, "hidden_size 64 and 4 layers, but checkpoint .* has hidden_size 32 and 4 layers"),
        ({"num_layers": 2}, "hidden_size 64 and 4 layers, but checkpoint .* has hidden_size 64 and 2 layers"),
    ],
    ids=["other-weights", "other-hidden-size", "other-layer-count"],
)
def test_a_prompt_for_another_model_is_refused(exported: ExportResult, tmp_path: Path, other_model: dict, problem: str):
    other = make_tiny_llama(tmp_path / "other-llama", **other_model)
    with pytest.raises(ValueError, match=problem):
        DistributedLlamaForSequenceClassification.from_pretrained(other, prompt=exported.folder, local_blocks=True)


def test_a_prompt_for_another_family_is_refused_naming_both(exported: ExportResult, tmp_path: Path):
    other = make_tiny_checkpoint(tmp_path / "tiny-qwen3", "qwen3")
    with pytest.raises(ValueError, match="was tuned on a llama model .* but checkpoint .* is a qwen3 model"):
        AutoDistributedModelForSequenceClassification.from_pretrained(other, prompt=exported.folder, local_blocks=True)


def test_a_manifest_naming_another_model_is_refused(prompt_copy: Path, exported: ExportResult):
    manifest = json.loads((prompt_copy / MANIFEST_FILE).read_text())
    manifest["model_fingerprint"] = "sha256:" + "0" * 64
    (prompt_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    model = DistributedLlamaForSequenceClassification.from_pretrained(
        exported.manifest.model_path,
        local_blocks=True,
        tuning_mode=exported.manifest.tuning_mode,
        pre_seq_len=exported.manifest.pre_seq_len,
        num_labels=exported.manifest.num_labels,
    )
    with pytest.raises(ValueError, match="with fingerprint sha256:0{64}, but checkpoint .* has fingerprint"):
        model.load_prompt(prompt_copy)


def test_a_prompt_for_another_tuning_mode_is_refused(exported: ExportResult):
    manifest = exported.manifest
    other_mode = "ptune" if manifest.tuning_mode == "deep_ptune" else "deep_ptune"
    model = DistributedLlamaForSequenceClassification.from_pretrained(
        manifest.model_path,
        local_blocks=True,
        tuning_mode=other_mode,
        pre_seq_len=manifest.pre_seq_len,
        num_labels=manifest.num_labels,
    )
    refusal = f"has tuning_mode='{manifest.tuning_mode}'.*built with tuning_mode='{other_mode}'"
    with pytest.raises(ValueError, match=refusal):
        model.load_prompt(exported.folder)
    with pytest.raises(ValueError, match=f"tuning_mode='{other_mode}' contradicts the exported prompt"):
        DistributedLlamaForSequenceClassification.from_pretrained(
            manifest.model_path, prompt=exported.folder, local_blocks=True, tuning_mode=other_mode
        )


@pytest.fixture(scope="session")
def bad_store(search_output: Path, exported: ExportResult, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("bad-store")
    ptune_config = folder / "ptune_config.json"
    settings = {"pre_seq_len": exported.manifest.pre_seq_len, "tuning_mode": exported.manifest.tuning_mode}
    ptune_config.write_text(json.dumps(settings))
    prompt_files = {PROMPT_FILE: exported.folder / PROMPT_FILE, PTUNE_CONFIG_FILE: ptune_config}
    return stalled_and_broken_store(folder, search_output / "config.yaml", prompt_files)


def test_an_experiment_without_a_finished_trial_is_refused_leaving_nothing(bad_store: str, tmp_path: Path):
    out = tmp_path / "exports" / "best"
    with pytest.raises(ValueError, match="the latest search 'stalled-search' .* has no FINISHED trial \\(KILLED\\)"):
        export_prompt(bad_store, out, experiment="stalled")
    assert [p for p in tmp_path.rglob("*") if p.is_file() or p.name.startswith(".")] == []


def test_an_export_failing_midway_leaves_nothing_half_written(bad_store: str, exported: ExportResult, tmp_path: Path):
    out = tmp_path / "best"
    with pytest.raises(ValueError, match="has no readable artifact head.safetensors"):
        export_prompt(bad_store, out, experiment="broken")
    assert list(tmp_path.iterdir()) == []

    shutil.copytree(exported.folder, out)  # an earlier export, to be replaced
    with pytest.raises(ValueError, match="has no readable artifact head.safetensors"):
        export_prompt(bad_store, out, experiment="broken", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert ExportedPrompt.read(out).manifest == exported.manifest


def test_an_existing_folder_is_not_replaced_without_overwrite(tracking_uri: str, prompt_copy: Path):
    with pytest.raises(ValueError, match="already exists; choose another --out or pass --overwrite"):
        export_prompt(tracking_uri, prompt_copy, experiment="tiny")
