"""An exported prompt as an MLflow Model: a ``pyfunc`` that classifies a ``text`` column, registered by name.

The model's artifacts are the prompt folder itself (``prompt.safetensors``, ``head.safetensors``,
``manifest.json``); loading it builds a :class:`~ptune_search.prompts.predict.PromptClassifier` on the
manifest's checkpoint, so it needs ptune-search installed and the checkpoint on the machine (the manifest's
folder, or its model alias prepared there). The blocks run in process unless the model config names a swarm::

    model = mlflow.pyfunc.load_model("models:/tiny/1")
    model.predict(pd.DataFrame({"text": ["Shares fell after the profit warning."]}))
    #   label     probabilities
    #   business  {"business": 0.61, "tech": 0.20, ...}
    mlflow.pyfunc.load_model("models:/tiny/1", model_config={"peers_file": "peers.txt"})  # through a swarm

The logged model's source run is the search's parent run; the trial it came from is a tag of the version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types.schema import ColSpec, DataType, Map, Schema

from ptune_search.models.prompt_folder import ExportedPrompt, MetricValue
from ptune_search.prompts.export import write_export

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from ptune_search.prompts.predict import PromptClassifier

logger = logging.getLogger(__name__)

TEXT_COLUMN = "text"
PROMPT_ARTIFACT = "prompt"
MODEL_NAME = "prompt_classifier"  # the logged model's name within its run
SOURCE_TRIAL_TAG = "ptune_search.source_run_id"
ENTRY_FILE = "pyfunc_entry.py"  # logged as the model's code: loading runs it instead of unpickling an object
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, TEXT_COLUMN)]),
    outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(Map(DataType.double), "probabilities")]),
)
# What the model needs installed besides ptune-search itself (not on a package index: see docs/mlflow.md).
REQUIREMENTS = ("mlflow", "torch", "transformers", "safetensors", "hivemind", "pandas", "pydantic")


@dataclasses.dataclass(frozen=True)
class ServingSettings:
    """Where the loaded model runs its blocks: ``mlflow.pyfunc.load_model(uri, model_config={...})`` sets these.

    With no swarm given (``initial_peers`` or ``peers_file``) the blocks run in process.
    """

    initial_peers: Optional[list[str]] = None
    peers_file: Optional[str] = None
    dht_prefix: Optional[str] = None
    model_path: Optional[str] = None  # the checkpoint folder, when not the manifest's
    batch_size: int = 8

    @classmethod
    def from_model_config(cls, config: Optional[dict[str, Any]]) -> "ServingSettings":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(config or {}) - known)
        if unknown:
            raise ValueError(
                f"unknown model_config keys {unknown} for a ptune-search prompt model; known: {sorted(known)}"
            )
        return cls(**(config or {}))


class PromptClassifierModel(PythonModel):
    """The pyfunc wrapper: ``predict`` takes a DataFrame with a ``text`` column, returns ``label`` and
    ``probabilities`` (every label, most likely first) per row, exactly as ``ptune-search predict --json``."""

    def load_context(self, context: PythonModelContext) -> None:
        from ptune_search.prompts.predict import PromptClassifier

        settings = ServingSettings.from_model_config(context.model_config)
        swarm = settings.initial_peers or settings.peers_file
        self.classifier: PromptClassifier = PromptClassifier(
            context.artifacts[PROMPT_ARTIFACT],
            model_path=settings.model_path,
            local_blocks=not swarm,
            initial_peers=settings.initial_peers,
            peers_file=settings.peers_file,
            dht_prefix=settings.dht_prefix,
            batch_size=settings.batch_size,
        )

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params: Optional[dict] = None):
        if TEXT_COLUMN not in model_input:
            raise ValueError(f"the input needs a {TEXT_COLUMN!r} column (got {list(model_input.columns)})")
        predictions = list(self.classifier.classify(str(text) for text in model_input[TEXT_COLUMN]))
        return pd.DataFrame(
            {
                "label": [prediction.label for prediction in predictions],
                "probabilities": [prediction.probabilities for prediction in predictions],
            }
        )


def register_prompt_model(
    tracking_uri: str, run_id: str, registered_name: str, metric: str = "val_accuracy", mode: str = "max"
) -> "ModelVersion":
    """Log trial run ``run_id``'s prompt as a pyfunc model of its search's parent run; register a new version."""
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / PROMPT_ARTIFACT
        folder.mkdir()
        manifest = write_export(client, run, folder, MetricValue(name=metric, mode=mode), tracking_uri)  # type: ignore[arg-type]
        ExportedPrompt.read(folder)
        with _tracking(tracking_uri):
            info = Model.log(
                artifact_path=None,
                name=MODEL_NAME,
                flavor=_PyfuncWithoutServingCheck,
                run_id=manifest.parent_run_id,
                python_model=str(Path(__file__).with_name(ENTRY_FILE)),
                artifacts={PROMPT_ARTIFACT: str(folder)},
                signature=SIGNATURE,
                input_example=pd.DataFrame({TEXT_COLUMN: [_example_text(manifest.source.get("task", {}))]}),
                pip_requirements=[f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS],
                # MLflow would load the model (its blocks too) to run the example; the prompt folder was read
                # above, and the example is one text, as the signature says.
                validate_serving_input=False,
            )
            # in the store's context too: the registry finds the logged model through the global tracking URI
            version = _new_version(client, registered_name, info.model_uri, manifest.parent_run_id, info.model_id)
    client.set_model_version_tag(registered_name, str(version), SOURCE_TRIAL_TAG, run_id)
    if manifest.metric.value is not None:
        client.set_model_version_tag(registered_name, str(version), metric, str(manifest.metric.value))
    return client.get_model_version(registered_name, str(version))


class _PyfuncWithoutServingCheck:
    """``mlflow.pyfunc`` as ``Model.log``'s flavor, taking the ``validate_serving_input`` switch that pyfunc's own
    ``save_model`` refuses (``Model.log`` hands every keyword to both)."""

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs: Any) -> None:
        mlflow.pyfunc.save_model(**kwargs)


def _new_version(client: MlflowClient, name: str, source: str, run_id: str, model_id: Optional[str]) -> int:
    """A new version of registered model ``name`` (created if new), through the client: MLflow's fluent
    registration prints its progress to stderr."""
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
            raise
    created = client.create_model_version(name, source, run_id=run_id, model_id=model_id, await_creation_for=0)
    return int(created.version)


def register_search_prompt(tracking_uri: str, parent_run_id: str, run_id: str, registered_name: str) -> None:
    """The end of a search: its best trial's prompt registered, unless a version from this search exists (the
    outbox may send the record again after a lost answer)."""
    client = MlflowClient(tracking_uri)
    versions = client.search_model_versions(f"run_id = '{parent_run_id}'")  # a name may hold quotes: compared here
    if any(version.name == registered_name for version in versions):
        return
    try:
        version = register_prompt_model(tracking_uri, run_id, registered_name)
    except (ValueError, FileNotFoundError) as error:
        client.get_run(parent_run_id)  # raises while the store is down: then the record waits and is sent again
        raise MlflowException(  # the store answers, the prompt cannot be registered: set aside, not retried
            f"cannot register the best prompt of run {run_id} as model {registered_name!r}: {error}",
            INVALID_PARAMETER_VALUE,
        ) from error
    logger.info("registered the best prompt as model %s version %s", registered_name, version.version)


def _example_text(task: dict[str, Any]) -> str:
    """The first example of the search's task, cut short: the input example the model is logged with."""
    from ptune_search.data import TaskSpec, load_examples

    try:
        texts = load_examples(TaskSpec(task["name"], task["text_column"], task["label_column"])).texts
    except (KeyError, FileNotFoundError, ValueError):
        return "An example text to classify."
    return texts[0][:300]


@contextlib.contextmanager
def _tracking(tracking_uri: str) -> Iterator[None]:
    """MLflow's model logging talks to the global tracking and registry URIs: point both at this store."""
    previous_tracking, previous_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_tracking)
        mlflow.set_registry_uri(previous_registry)
