"""A Tune callback in the driver that stops the search while the output disk still holds one more round."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ray import tune

from ptune_search.search.disk_space import OutputDisk, tree_bytes

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

CHECK_EVERY_S = 2.0  # between results too: something else may be filling the disk while trials train


class FreeSpaceWatch(tune.Callback):
    """Raises :class:`~ptune_search.search.disk_space.OutputDiskFull` out of ``Tuner.fit`` once the free space on the
    output disk drops below the search's reserve.

    Raising ends the search as Ctrl-C does: trials stop, Tune's experiment state (snapshotted every second)
    and every trial's last checkpoint stay, and ``--resume`` goes on from them. Put it after the MLflow
    callback, so the result that crossed the line is recorded first. The reserve grows to the largest
    checkpoint seen, should real checkpoints be larger than the estimate.
    """

    def __init__(self, disk: OutputDisk):
        self.disk = disk
        self._next_check = 0.0

    def on_trial_result(self, iteration: int, trials: list, trial: "Trial", result: dict, **info: Any) -> None:
        self._stop_if_low()

    def on_checkpoint(
        self, iteration: int, trials: list, trial: "Trial", checkpoint: tune.Checkpoint, **info: Any
    ) -> None:
        self.disk = self.disk.with_checkpoint_seen(tree_bytes(checkpoint.path))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() >= self._next_check:
            self._stop_if_low()

    def _stop_if_low(self) -> None:
        self._next_check = time.monotonic() + CHECK_EVERY_S
        error = self.disk.running_low()
        if error is not None:
            raise error
