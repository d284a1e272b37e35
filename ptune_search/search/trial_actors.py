"""Trial actors end before Ray does, so a stopping search prints no actor's traceback.

An actor still alive, or still tearing its interpreter down after Tune stopped it, when the driver shuts
Ray down gets SIGTERM; Ray's handler raises ``SystemExit`` wherever the actor is (often a weakref callback
during interpreter teardown, "Exception ignored in WeakSet._remove"), and Ray forwards that traceback into
the driver's output. Ctrl-C skips Tune's own cleanup altogether and leaves trials running.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import psutil
import ray
from ray import tune

if TYPE_CHECKING:
    from ray.actor import ActorHandle
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

EXIT_TIMEOUT_S = 30.0  # how long the driver waits for this node's trial processes to be gone


class TrialActors(tune.Callback):
    """Notes every trial actor the driver's Tuners start, so :meth:`end_all` (or leaving a ``with`` block) can
    end them before the swarm and Ray shut down.

    One instance per driver: Tune pickles its callbacks with the run, and a resumed run's copy comes back
    as the driver's own, which therefore also sees the actors of restored trials. An actor Tune reuses for
    several trials (or keeps cached for the next one) is noted once, at its first trial.
    """

    _of_this_driver: ClassVar[Optional["TrialActors"]] = None

    def __init__(self) -> None:
        self._started: dict["ActorHandle", ray.ObjectRef] = {}  # actor -> its (node ip, pid) once set up

    @classmethod
    def of_this_driver(cls) -> "TrialActors":
        if cls._of_this_driver is None:
            cls._of_this_driver = cls()
        return cls._of_this_driver

    def __reduce__(self) -> tuple:
        return TrialActors.of_this_driver, ()

    def on_trial_start(self, iteration: int, trials: list, trial: "Trial", **info: Any) -> None:
        actor = trial.temporary_state.ray_actor
        if actor is not None and actor not in self._started:
            self._started[actor] = actor.get_current_ip_pid.remote()

    def __enter__(self) -> "TrialActors":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end_all()

    def end_all(self, timeout: float = EXIT_TIMEOUT_S) -> None:
        """Kill every trial actor still running (no Python code runs in it, so nothing is printed) and wait
        until the trial processes of this node are gone, those Tune stopped included."""
        ready, _ = ray.wait(list(self._started.values()), num_returns=len(self._started), timeout=0)
        local_ip = ray.util.get_node_ip_address()
        processes = [process for process in (_local_process(where, local_ip) for where in ready) if process]
        for actor in self._started:
            ray.kill(actor)
        self._started.clear()
        _, alive = psutil.wait_procs(processes, timeout=timeout)
        if alive:
            logger.warning("trial processes %s did not exit within %.0f s", [p.pid for p in alive], timeout)


def _local_process(where: ray.ObjectRef, local_ip: str) -> Optional[psutil.Process]:
    """The trial's process if it runs on this node (other nodes' processes end with their Ray job)."""
    try:
        ip, pid = ray.get(where)
        return psutil.Process(pid) if ip == local_ip else None
    except (ray.exceptions.RayError, psutil.NoSuchProcess):  # died while set up, or already gone
        return None
