"""The search's console: one line per evaluation of a trial, with the run's counts and the time left.

Tune's own tables (dozens of lines every 30 s) are off; this view prints what a user follows: which trial, its
step and latest validation accuracy, how many trials run, finished and were stopped, the time elapsed and an
estimate of the time left. Library chatter goes to the log file instead (see ``console``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from ray import tune

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


class SearchProgress(tune.Callback):
    """A search's driver starts one (:meth:`start`); the head sweeps and the trials share its clock, and a resumed
    run's unpickled callback is the driver's current one (as with :class:`TrialActors`)."""

    _of_this_driver: ClassVar[Optional["SearchProgress"]] = None

    def __init__(self, max_steps: int) -> None:
        self.started = time.monotonic()
        self.max_steps = max_steps
        self.total = 0  # trials of the current Tune run
        self.steps: dict[str, int] = {}  # trial id -> steps done
        self.ended: dict[str, str] = {}  # trial id -> "finished", "stopped" or "failed"
        self.numbers: dict[str, int] = {}  # trial id -> its number in the search, in the order trials start
        self.run_started = self.started

    @classmethod
    def start(cls, max_steps: int) -> "SearchProgress":
        """A new search's progress, from now on the one this driver's Tune runs report to."""
        cls._of_this_driver = cls(max_steps)
        return cls._of_this_driver

    @classmethod
    def _current(cls, max_steps: int) -> "SearchProgress":
        return cls._of_this_driver or cls.start(max_steps)

    def __reduce__(self) -> tuple:
        return SearchProgress._current, (self.max_steps,)

    def setup(self, total_num_samples: Optional[int] = None, **info: Any) -> None:
        self.total = total_num_samples or 0
        self.steps, self.ended, self.run_started = {}, {}, time.monotonic()

    def on_trial_start(self, iteration: int, trials: list, trial: "Trial", **info: Any) -> None:
        self.steps.setdefault(trial.trial_id, 0)
        self._print(f"{self._name(trial)} ({trial.trial_id}) started: {_params(trial.config)}")

    def on_trial_result(self, iteration: int, trials: list, trial: "Trial", result: dict, **info: Any) -> None:
        self.steps[trial.trial_id] = int(result["step"])
        self._print(
            f"{self._name(trial)} step {result['step']}: val accuracy {result['eval_accuracy']:.3f} "
            f"(best {result['val_accuracy']:.3f}){self._counts()}"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: "Trial", **info: Any) -> None:
        last = trial.last_result or {}
        how = "finished" if last.get("finished") else f"stopped by ASHA at step {last.get('step', 0)}"
        self.ended[trial.trial_id] = "finished" if last.get("finished") else "stopped"
        self._print(f"{self._name(trial)} {how}{self._counts()}")

    def on_trial_error(self, iteration: int, trials: list, trial: "Trial", **info: Any) -> None:
        self.ended[trial.trial_id] = "failed"
        self._print(f"{self._name(trial)} failed (see {trial.path}/error.txt){self._counts()}")

    def _counts(self) -> str:
        ended = list(self.ended.values())
        running = len(self.steps) - len(ended)
        counts = f"{running} running, {ended.count('finished')} finished, {ended.count('stopped')} stopped"
        if ended.count("failed"):
            counts += f", {ended.count('failed')} failed"
        left = self._seconds_left()
        return f"  [{counts}; {_minutes(time.monotonic() - self.started)}" + (
            f", at most ~{_minutes(left)} left in this stage]" if left is not None else "]"
        )

    def _seconds_left(self) -> Optional[float]:
        """This run's steps still to go (a stopped trial's are not) at the pace of its steps so far."""
        done = sum(self.steps.values())
        if not done or not self.max_steps or not self.total:
            return None
        running = [steps for trial_id, steps in self.steps.items() if trial_id not in self.ended]
        to_go = sum(self.max_steps - steps for steps in running) + (self.total - len(self.steps)) * self.max_steps
        return to_go * (time.monotonic() - self.run_started) / done

    def _name(self, trial: "Trial") -> str:
        if "bare_text" in trial.config:
            return "head sweep on the bare text" if trial.config["bare_text"] else "head sweep on the template"
        return f"trial {self.numbers.setdefault(trial.trial_id, len(self.numbers) + 1)}"

    def _print(self, line: str) -> None:
        print(f"{_minutes(time.monotonic() - self.started):>6} {line}", flush=True)


def _params(config: dict[str, Any]) -> str:
    if not config.get("tuning_mode"):
        return f"head only, lrs {', '.join(f'{lr:.1e}' for lr in config.get('baseline_lrs', []))}"
    return f"{config['tuning_mode']}, pre_seq_len {config['pre_seq_len']}, lr {config['lr']:.2e}"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"
