"""The data a trial trains and is validated on, described as MLflow dataset inputs (the runs table's Dataset column).

Each split becomes one dataset: the task's name, a digest of exactly the examples in that split (so two
searches on the same data show the same digest), where the data came from (the task file, or the packaged
corpus's folder and package) and the sizes of every split. The driver builds these once from the config,
with the trials' own split function and seed, and the outbox carries them as JSON with each trial's start::

    splits = split_task(spec, train_size=200, validation_size=50, test_size=0, seed=0)
    inputs = task_dataset_inputs(spec, splits, seed=0)
    client.log_inputs(run_id, [input.to_mlflow() for input in inputs])
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput

    from ptune_search.data import Examples, TaskSpec, TaskSplits

CONTEXT_TAG = "mlflow.data.context"  # MLflow's tag for what the run did with a dataset (train, validation)
DIGEST_CHARS = 16


@dataclasses.dataclass(frozen=True)
class TaskDatasetInput:
    """One split as an MLflow dataset input; plain JSON fields, so it travels through the outbox as it is."""

    name: str
    digest: str
    source_type: str
    source: str  # JSON, as MLflow stores a dataset source
    schema: str  # JSON
    profile: str  # JSON: this split's rows, every split's size, labels, seed
    context: str  # "train" or "validation"

    def to_mlflow(self) -> "DatasetInput":
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(self.name, self.digest, self.source_type, self.source, self.schema, self.profile)
        return DatasetInput(dataset, [InputTag(CONTEXT_TAG, self.context)])

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> "TaskDatasetInput":
        return cls(**fields)


def task_dataset_inputs(spec: "TaskSpec", parts: "TaskSplits", seed: int) -> list[TaskDatasetInput]:
    """The train and validation splits a trial of this task uses (and the held-out test split, when there is
    one); ``seed`` is the one they were split with."""
    splits = {"train": parts.train, "validation": parts.validation}
    if len(parts.test):
        splits["test"] = parts.test
    sizes = {context: len(split) for context, split in splits.items()}
    name = spec.name if _is_packaged(spec) else Path(spec.name).name
    source_type, source = _source(spec)
    schema = {"columns": [{"name": spec.text_column, "type": "string"}, {"name": spec.label_column, "type": "string"}]}
    inputs = []
    for context, split in splits.items():
        profile = {
            "num_rows": len(split),
            "split_sizes": sizes,
            "label_names": parts.train.label_names,
            "split_seed": seed,
        }
        inputs.append(
            TaskDatasetInput(
                name=name,
                digest=examples_digest(split),
                source_type=source_type,
                source=json.dumps(source),
                schema=json.dumps(schema),
                profile=json.dumps(profile),
                context=context,
            )
        )
    return inputs


def examples_digest(examples: "Examples") -> str:
    """sha256 of the (text, label name) pairs in order, shortened as MLflow's own dataset digests are."""
    digest = hashlib.sha256()
    for text, label in zip(examples.texts, examples.labels):
        for part in (text, examples.label_names[label]):
            encoded = part.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()[:DIGEST_CHARS]


def _is_packaged(spec: "TaskSpec") -> bool:
    from ptune_search.data import PACKAGED_TASKS

    return spec.name in PACKAGED_TASKS


def _source(spec: "TaskSpec") -> tuple[str, dict[str, Any]]:
    """A task file is a local source; a packaged task names its package and the folder it is read from."""
    if not _is_packaged(spec):
        return "local", {"uri": Path(spec.name).resolve().as_uri()}
    from ptune_search.data import packaged_task_source

    package, folder = packaged_task_source(spec.name)
    version = importlib.metadata.version(package)
    return "code", {"tags": {"package": f"{package}=={version}", "uri": folder.as_uri(), "task": spec.name}}
