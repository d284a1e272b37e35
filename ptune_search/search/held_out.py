"""The held-out figure: a finished trial's final prompt and head, evaluated once on the test split.

Selection (the best trial, ASHA, Optuna) only ever sees validation; the test split is read here, for the
chosen trial and the baseline only, so their test accuracies are free of selection bias. A trial's test starts
as soon as it may be the one chosen, so most tests end while other trials still train, and stops as soon as
another trial takes its place.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Optional

import ray
import torch
from ray import tune
from ray.tune.experiment import Trial
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ptune_search.models.prompt_folder import HEAD_FILE, PROMPT_FILE
from ptune_search.models.ptune import PTuneConfig
from ptune_search.search.report import best_finished_trial
from ptune_search.search.trial import TrialSettings, build_classifier, ptune_config_of
from ptune_search.training.steps import batch_logits, evaluation_of


@dataclasses.dataclass(frozen=True)
class TestFigures:
    accuracy: float
    loss: float


class HeldOutTests:
    """Held-out evaluations, each started as soon as its trial is known to need one, so that they run while
    other trials train: the head sweeps' rows when the sweeps end, and a trial that finishes its budget ahead
    of every trial finished before it (``LeadingTrialTests``). ``add_figures`` starts what is still missing (a
    resumed run's best) and waits.

    One actor evaluates them all, in turn: it joins the swarm and reads the frozen weights once, when the
    trials start, so the test of the search's best does not wait for a new process. It asks for no CPU (a
    task queued behind Tune's trials would start only when they end). The driver reads the (small) prompt and
    head tensors, so the actor may run on any node of a cluster. A dropped test (a lead another trial took)
    stops after the batch it is computing, or never starts: on a machine whose cores the trials share, every
    test nobody reads slows them.

    Example (in the driver, with Ray and the swarm up)::

        with HeldOutTests(settings) as tests:
            tests.start(trial_id, config, checkpoint)   # returns at once
            tests.drop(trial_id)                        # no longer needed: stops it
            tests.add_figures(rows, checkpoints)        # each row gets test_accuracy and test_loss
    """

    def __init__(self, settings: TrialSettings):
        self._tester = _Tester.remote(settings)  # type: ignore[attr-defined]
        self._test_ids = itertools.count()
        self._started: list[str] = []
        self._pending: dict[str, tuple[int, ray.ObjectRef]] = {}  # trial id -> (test id, its figures)

    def __enter__(self) -> "HeldOutTests":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Tests still running are dropped (a search that fails need not wait for them); the actor leaves the
        swarm before the swarm stops."""
        for trial_id in list(self._pending):
            self.drop(trial_id)
        ray.get(self._tester.close.remote())
        ray.kill(self._tester)

    @property
    def started(self) -> list[str]:
        """The trials whose tests have started, in that order."""
        return list(self._started)

    @property
    def pending(self) -> list[str]:
        """The trials whose tests have started and are not dropped."""
        return list(self._pending)

    def start(self, trial_id: str, config: dict[str, Any], checkpoint: tune.Checkpoint) -> None:
        if trial_id in self._pending:
            return
        with checkpoint.as_directory() as folder:
            tensors = {**load_file(Path(folder) / PROMPT_FILE), **load_file(Path(folder) / HEAD_FILE)}
        test_id = next(self._test_ids)
        self._started.append(trial_id)
        self._pending[trial_id] = (test_id, self._tester.evaluate.remote(test_id, config, tensors))

    def drop(self, trial_id: str) -> None:
        """Stops a started test whose figures no one will read; ``start`` may start it again."""
        if trial_id in self._pending:
            test_id, _ = self._pending.pop(trial_id)
            self._tester.drop.remote(test_id)

    def add_figures(
        self, rows: list[dict[str, Any]], checkpoints: dict[str, tuple[dict[str, Any], tune.Checkpoint]]
    ) -> None:
        """Each row's ``test_accuracy`` and ``test_loss``, from its trial's final checkpoint."""
        for row in rows:
            self.start(row["trial_id"], *checkpoints[row["trial_id"]])
        for row in rows:
            figures = ray.get(self._pending[row["trial_id"]][1])
            row["test_accuracy"], row["test_loss"] = figures.accuracy, figures.loss


class LeadingTrialTests(tune.Callback):
    """Starts the held-out test of each trial that finishes its budget ahead of those finished before it (the
    order ``best_finished_trial`` ranks by): the search's best is then usually tested before its last trial
    ends. A lead that a later trial takes drops the test of the trial that held it.

    Tune stores its callbacks with the run; a stored copy starts nothing (its actor belongs to the driver
    that stored it), and a resumed search tests its best at the end."""

    def __init__(self, tests: Optional[HeldOutTests], metric: str):
        self.tests, self.metric = tests, metric
        self._finished: list[dict[str, Any]] = []
        self._leader: Optional[str] = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tests": None}

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        result = trial.last_result or {}
        if self.tests is None or not result.get("finished") or result.get(self.metric) is None:
            return
        trial_id = result.get("trial_id", trial.trial_id)
        row = {"trial_id": trial_id, "status": "finished", self.metric: result[self.metric]}
        row["val_loss"] = result.get("val_loss")
        self._finished.append(row)
        if best_finished_trial(self._finished, self.metric) is row and trial.checkpoint is not None:
            self.tests.start(trial_id, trial.config, trial.checkpoint)
            if self._leader is not None:
                self.tests.drop(self._leader)
            self._leader = trial_id


@ray.remote(num_cpus=0, max_restarts=0, concurrency_groups={"drops": 1})
class _Tester:
    """The held-out evaluator: one classifier, rebuilt for each trial's prompt settings (as a reused trial
    actor is), on one swarm connection. Tests run one at a time; ``drop`` runs beside them."""

    def __init__(self, settings: TrialSettings):
        torch.set_num_threads(1)
        self.settings = settings
        self._dropped: set[int] = set()
        tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        self.model = build_classifier(
            settings.model_path, settings.task.num_labels, tokenizer.pad_token_id, PTuneConfig(), settings.swarm
        )

    def evaluate(self, test_id: int, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Optional[TestFigures]:
        """The figures, or None once the test is dropped."""
        test = self.settings.task_of(config).test
        assert test is not None  # the driver asks only when the task has a test split
        if test_id in self._dropped:
            return None
        self.model = self.model.rebuilt(**dataclasses.asdict(ptune_config_of(config)))
        unexpected = self.model.load_state_dict(tensors, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"the final checkpoint holds tensors the model lacks: {unexpected}")
        logits = []
        for batch in batch_logits(self.model, test, self.settings.eval_batch_size):
            if test_id in self._dropped:
                return None
            logits.append(batch)
        evaluation = evaluation_of(torch.cat(logits), test.labels)
        return TestFigures(accuracy=evaluation.accuracy, loss=evaluation.loss)

    @ray.method(concurrency_group="drops")
    def drop(self, test_id: int) -> None:
        self._dropped.add(test_id)

    def close(self) -> None:
        self.model.close()
