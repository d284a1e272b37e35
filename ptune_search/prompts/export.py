"""Best-prompt export: from a search's MLflow records to a self-contained prompt folder.

``export_prompt`` picks the best FINISHED trial of the latest search in an experiment (or the run it is
given), downloads its prompt and head, and writes them with a manifest (see
:mod:`ptune_search.models.prompt_folder`) to ``out``. The folder is assembled beside ``out`` and renamed into place
only once it reads back cleanly, so a failed export leaves nothing behind. The exported run is tagged
``ptune_search.exported_to`` in MLflow::

    result = export_prompt("sqlite:////abs/runs/tiny/mlflow.db", "best-prompt", experiment="tiny")
    result.manifest.metric.value   # the best trial's final val_accuracy
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Optional

import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from ptune_search.models.prompt_folder import (
    HEAD_FILE,
    PROMPT_FILE,
    PTUNE_CONFIG_FILE,
    ExportedPrompt,
    MetricValue,
    PromptManifest,
    TokenizerSettings,
    file_sha256,
    write_manifest,
)
from ptune_search.prompts.run_tags import BEST_TAG, ROLE_TAG, TRIAL_TAG

if TYPE_CHECKING:
    from mlflow.entities import Run

EXPORTED_TO_TAG = "ptune_search.exported_to"
EXPORTED_AT_TAG = "ptune_search.exported_at"
SEARCH_CONFIG_FILE = "config.yaml"
EXPORTABLE_ROLES = ("trial", "baseline")
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"

Mode = Literal["max", "min"]


@dataclasses.dataclass(frozen=True)
class ExportResult:
    folder: Path
    manifest: PromptManifest


def export_prompt(
    tracking_uri: str,
    out: str | Path,
    *,
    experiment: Optional[str] = None,
    run_id: Optional[str] = None,
    metric: str = "val_accuracy",
    mode: Mode = "max",
    overwrite: bool = False,
) -> ExportResult:
    """Export the best trial of the latest search in ``experiment`` (or the run ``run_id``) to ``out``."""
    run = best_or_named_run(tracking_uri, experiment, run_id, metric, mode)
    client = _client(tracking_uri)
    out = Path(out).absolute()
    with _staged_folder(out, overwrite) as staging:
        manifest = write_export(client, run, staging, MetricValue(name=metric, mode=mode), tracking_uri)
        ExportedPrompt.read(staging)  # what we hand over must read back
        exported_at = manifest.source["exported_at"]
        client.set_tag(run.info.run_id, EXPORTED_TO_TAG, str(out))
        client.set_tag(run.info.run_id, EXPORTED_AT_TAG, exported_at)
    return ExportResult(out, manifest)


def export_peft_adapter(
    tracking_uri: str,
    out: str | Path,
    *,
    experiment: Optional[str] = None,
    run_id: Optional[str] = None,
    metric: str = "val_accuracy",
    mode: Mode = "max",
    overwrite: bool = False,
) -> ExportResult:
    """``ptune-search export --format peft``: the chosen trial's prompt, written as a PEFT adapter to ``out``."""
    from ptune_search.models.peft_adapter import write_peft_adapter

    out = Path(out).absolute()
    with tempfile.TemporaryDirectory() as scratch:
        exported = export_prompt(
            tracking_uri, Path(scratch) / "prompt", experiment=experiment, run_id=run_id, metric=metric, mode=mode
        )
        prompt = ExportedPrompt.read(exported.folder)
        with _staged_folder(out, overwrite) as staging:
            write_peft_adapter(prompt, staging)  # refuses deep_ptune before writing anything
    _client(tracking_uri).set_tag(prompt.manifest.source_run_id, EXPORTED_TO_TAG, str(out))
    return ExportResult(out, prompt.manifest)


def best_or_named_run(
    tracking_uri: str, experiment: Optional[str], run_id: Optional[str], metric: str, mode: Mode
) -> "Run":
    """The trial run ``run_id`` (checked to be one), or else the best trial of ``experiment``'s latest search."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min' (got {mode!r})")
    if experiment is None and run_id is None:
        raise ValueError("name the search's experiment (--experiment NAME) or a trial run (--run-id ID)")
    client = _client(tracking_uri)
    return _named_run(client, run_id, experiment) if run_id else best_trial_run(client, experiment, metric, mode)


def best_trial_run(client: MlflowClient, experiment: str, metric: str, mode: Mode) -> "Run":
    """Among the FINISHED trial runs of the experiment's latest search, the best final ``metric``.

    Ties go to the run the search tagged best, then to the earlier run.
    """
    experiment_id = _experiment_id(client, experiment)
    parents = client.search_runs(
        [experiment_id], f"tags.`{ROLE_TAG}` = 'search'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not parents:
        raise ValueError(f"experiment {experiment!r} holds no search run; run `ptune-search search CONFIG` first")
    parent = parents[0]
    trials = client.search_runs(
        [experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}' and tags.`{ROLE_TAG}` = 'trial'"
    )
    finished = [run for run in trials if run.info.status == "FINISHED"]
    search = f"the latest search {parent.info.run_name!r} (run {parent.info.run_id}, {parent.info.status})"
    if not finished:
        statuses = ", ".join(sorted(run.info.status for run in trials)) or "no trial runs at all"
        raise ValueError(
            f"{search} in experiment {experiment!r} has no FINISHED trial ({statuses}); let it finish "
            "(`ptune-search search CONFIG --resume`) or export a run by --run-id"
        )
    scored = [run for run in finished if metric in run.data.metrics]
    if not scored:
        logged = sorted({key for run in finished for key in run.data.metrics})
        raise ValueError(f"no FINISHED trial of {search} logged metric {metric!r}; pick one of {logged} with --metric")
    sign = 1.0 if mode == "max" else -1.0
    return max(
        scored,
        key=lambda run: (sign * run.data.metrics[metric], run.data.tags.get(BEST_TAG) == "true", -run.info.start_time),
    )


def _client(tracking_uri: str) -> MlflowClient:
    """A client for an existing store: a typo in a sqlite path must not create an empty database."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///") :])
        if not path.is_file():
            raise FileNotFoundError(f"no MLflow database at {path} (tracking URI {tracking_uri}); check --tracking-uri")
    return MlflowClient(tracking_uri)


def _experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment {name!r} in the tracking store; known experiments: {known}")
    return found.experiment_id


def _named_run(client: MlflowClient, run_id: str, experiment: Optional[str]) -> "Run":
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"no run {run_id!r} in the tracking store; copy a trial run's id from the MLflow UI") from None
    if experiment is not None and run.info.experiment_id != _experiment_id(client, experiment):
        raise ValueError(f"run {run_id} does not belong to experiment {experiment!r}; drop --experiment or fix it")
    role = run.data.tags.get(ROLE_TAG)
    if role not in EXPORTABLE_ROLES:
        raise ValueError(
            f"run {run_id} is a {role or 'non-ptune-search'} run, not a trial: only trial (or baseline) runs of a "
            "search hold a prompt; pass one of the search's child runs"
        )
    return run


def write_export(
    client: MlflowClient, run: "Run", folder: Path, metric: MetricValue, tracking_uri: str
) -> PromptManifest:
    """Download the run's tensors into ``folder`` and write the manifest that describes them."""
    from transformers import AutoConfig

    from ptune_search.data import TEXT_SLOT, TaskSpec, load_examples
    from ptune_search.models.fingerprint import model_fingerprint
    from ptune_search.pretrained import resolve_model

    run_id = run.info.run_id
    parent_id = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
    if parent_id is None:
        raise ValueError(
            f"run {run_id} has no parent search run; only runs made by `ptune-search search` can be exported"
        )
    with tempfile.TemporaryDirectory() as scratch:
        search_config = yaml.safe_load(_download(client, parent_id, SEARCH_CONFIG_FILE, Path(scratch)).read_text())
        ptune = json.loads(_download(client, run_id, PTUNE_CONFIG_FILE, Path(scratch)).read_text())
    for name in (PROMPT_FILE, HEAD_FILE):
        _download(client, run_id, name, folder)
    model = str(_setting(search_config, "model", parent_id))
    task = {key: _setting(search_config, f"task.{key}", parent_id) for key in ("name", "text_column", "label_column")}
    max_length = int(_setting(search_config, "task.max_length", parent_id))
    # The trials' template (searches before templates had none); the baseline read the bare text.
    template = search_config.get("search_space", {}).get("template", TEXT_SLOT)
    if run.data.params.get("bare_text") == "True":
        template = TEXT_SLOT
    model_path = resolve_model(model)
    config = AutoConfig.from_pretrained(model_path)
    skip_invalid_rows = bool(search_config.get("task", {}).get("skip_invalid_rows", False))
    spec = TaskSpec(task["name"], task["text_column"], task["label_column"], skip_invalid_rows)
    label_names = load_examples(spec).label_names
    manifest = PromptManifest(
        model=model,
        model_path=str(model_path),
        model_fingerprint=model_fingerprint(model_path),
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        tuning_mode=ptune["tuning_mode"],
        pre_seq_len=int(ptune["pre_seq_len"]) if ptune["tuning_mode"] else 0,
        label_names=[str(name) for name in label_names],
        tokenizer=_tokenizer_settings(model_path, max_length, template),
        metric=_final_metric(client, run_id, metric),
        source_run_id=run_id,
        parent_run_id=parent_id,
        files={name: file_sha256(folder / name) for name in (PROMPT_FILE, HEAD_FILE)},
        source=_source(run, tracking_uri, task, search_config),
    )
    write_manifest(folder, manifest)
    return manifest


def _tokenizer_settings(model_path: Path, max_length: int, template: str) -> TokenizerSettings:
    """How the trials tokenized: what predict must do again."""
    from transformers import AutoTokenizer

    from ptune_search.data import prepare_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prepare_tokenizer(tokenizer)  # what trials do before tokenizing
    return TokenizerSettings(
        max_length=max_length,
        padding_side=tokenizer.padding_side,
        truncation_side=tokenizer.truncation_side,
        pad_token=tokenizer.pad_token,
        pad_token_id=tokenizer.pad_token_id,
        template=template,
    )


def _source(run: "Run", tracking_uri: str, task: dict[str, Any], search_config: dict[str, Any]) -> dict[str, Any]:
    """Where the prompt came from: its run, trial and search."""
    return {
        "experiment_id": run.info.experiment_id,
        "tracking_uri": tracking_uri,
        "run_name": run.info.run_name,
        "run_status": run.info.status,
        "trial_id": run.data.tags.get(TRIAL_TAG),
        "lr": _float_or_none(run.data.params.get("lr")),
        "prompt_init": run.data.params.get("prompt_init"),
        "test_accuracy": run.data.metrics.get("test_accuracy"),  # the held-out split, measured after the search
        "task": task,
        "seed": search_config.get("seed"),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _download(client: MlflowClient, run_id: str, name: str, folder: Path) -> Path:
    try:
        with _no_progress_bars():
            return Path(client.download_artifacts(run_id, name, str(folder)))
    except (MlflowException, OSError) as error:
        raise ValueError(
            f"run {run_id} has no readable artifact {name} ({str(error).splitlines()[0]}); was the run finished "
            "by `ptune-search search`, and is its artifact store reachable from here?"
        ) from None


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar per downloaded file; three small files need none."""
    previous = os.environ.get(PROGRESS_BAR_ENV)
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PROGRESS_BAR_ENV, None)
        else:
            os.environ[PROGRESS_BAR_ENV] = previous


def _setting(config: dict[str, Any], dotted: str, parent_id: str) -> Any:
    value: Any = config
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ValueError(
                f"{SEARCH_CONFIG_FILE} of search run {parent_id} has no {dotted}; it is not a search config"
            )
        value = value[key]
    return value


def _final_metric(client: MlflowClient, run_id: str, metric: MetricValue) -> MetricValue:
    history = client.get_metric_history(run_id, metric.name)
    if not history:
        return metric
    last = max(history, key=lambda m: (m.step, m.timestamp))
    return metric.model_copy(update={"value": float(last.value), "step": int(last.step)})


def _float_or_none(text: Optional[str]) -> Optional[float]:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


@contextlib.contextmanager
def _staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh folder beside ``out`` that becomes ``out`` when the block succeeds and vanishes when it fails."""
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the export private to its writer
    try:
        yield staging
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old, out)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
