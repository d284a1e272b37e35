"""A Tune callback in the driver that stops the search while the output disk still holds one more round."""

from __future__ import annotations

import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from ray import tune

from ptune_search.search.disk_space import OutputDisk, OutputDiskFull, tree_bytes

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

CHECK_EVERY_S = 2.0  # between results too: something else may be filling the disk while trials train


class FreeSpaceWatch(tune.Callback):
    """Ends ``Tuner.fit`` with :class:`~ptune_search.search.disk_space.OutputDiskFull` once the free space on the
    output disk drops below the search's reserve.

    The stop goes through Tune's own graceful interrupt (SIGUSR1, which Tune handles whenever ``fit`` runs in
    the main thread): Tune finishes its step, writes its experiment state one last time and waits for it, stops
    the trials, and only then does this callback raise, from ``on_experiment_end``. Raising at once would leave
    the stored state as old as its last background sync, which lags seconds behind under load: a trial started
    meanwhile would have MLflow records that no resumed run knows. Every trial's last checkpoint stays, and
    ``--resume`` goes on from them.

    Put it last: after the MLflow callback, so the result that crossed the line is recorded first, and after
    every callback that must see the experiment end. The reserve grows to the largest checkpoint seen, should
    real checkpoints be larger than the estimate.
    """

    def __init__(self, disk: OutputDisk):
        self.disk = disk
        self._next_check = 0.0
        self._stopped: Optional[OutputDiskFull] = None

    def on_trial_result(self, iteration: int, trials: list, trial: "Trial", result: dict, **info: Any) -> None:
        self._stop_if_low()

    def on_checkpoint(
        self, iteration: int, trials: list, trial: "Trial", checkpoint: tune.Checkpoint, **info: Any
    ) -> None:
        self.disk = self.disk.with_checkpoint_seen(tree_bytes(checkpoint.path))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() >= self._next_check:
            self._stop_if_low()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._stopped is not None:
            raise self._stopped

    def _stop_if_low(self) -> None:
        self._next_check = time.monotonic() + CHECK_EVERY_S
        if self._stopped is not None:
            return
        error = self.disk.running_low()
        if error is None:
            return
        if not _tune_handles_interrupts():
            raise error  # no graceful stop to ask for: stop now, from the state of the last sync
        self._stopped = error
        signal.raise_signal(signal.SIGUSR1)


def _tune_handles_interrupts() -> bool:
    """Tune installs its SIGUSR1 handler (a graceful stop) when ``fit`` runs in the main thread, as callbacks do."""
    return threading.current_thread() is threading.main_thread() and callable(signal.getsignal(signal.SIGUSR1))
