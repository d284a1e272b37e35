"""Hand-made MLflow stores for exports that must fail: searches whose runs are not exportable."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from ptune_search.search.tracking.records import ROLE_TAG


def stalled_and_broken_store(folder: Path, config_yaml: Path, prompt_files: dict[str, Path]) -> str:
    """A store with two experiments, each with one search:

    * ``stalled``: its only trial was stopped early (KILLED), so nothing finished;
    * ``broken``: its trial FINISHED with a prompt and ptune_config.json, but no head.safetensors.
    """
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    for name, status in (("stalled", "KILLED"), ("broken", "FINISHED")):
        experiment = client.create_experiment(name, artifact_location=(folder / name).as_uri())
        parent = client.create_run(experiment, tags={ROLE_TAG: "search"}, run_name=f"{name}-search").info.run_id
        client.log_artifact(parent, str(config_yaml))
        tags = {"mlflow.parentRunId": parent, ROLE_TAG: "trial"}
        child = client.create_run(experiment, tags=tags, run_name=f"{name}-trial").info.run_id
        client.log_metric(child, "val_accuracy", 0.5, step=3)
        if name == "broken":
            for file in prompt_files.values():
                client.log_artifact(child, str(file))
        client.set_terminated(child, status)
        client.set_terminated(parent, "FINISHED")
    return uri
