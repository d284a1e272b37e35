"""Room on the output disk: a search that cannot store one more round of results refuses to start, stops
before its writes fail, and reports a full disk in one message instead of a traceback.

Everything a search keeps lies under ``output_dir`` by default: the MLflow store and artifacts, Tune's trial
checkpoints and experiment state, and the Optuna study. Each round (one evaluation window of every running
trial) adds one checkpoint per running trial, and Tune keeps them all. On a full disk sqlite refuses the
write and rolls it back, but a trial's checkpoint can be left half-written, so the search stops while the
next round still fits; what it stored stays readable and ``--resume`` continues from there::

    disk = OutputDisk.for_search(config, model_path)
    disk.check_room_to_start()      # OutputDiskFull names the path, the free and the needed bytes
    with full_disk_reported(disk):  # ENOSPC or a full sqlite store -> OutputDiskFull with the same advice
        ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import shutil
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:
    from ptune_search.config import ExperimentConfig

MIB = 1 << 20
# What the stores add in one round besides checkpoints: sqlite pages and rollback journals of MLflow and
# Optuna, Tune's result files and its experiment state, which is rewritten through a temporary copy.
STORE_MARGIN_BYTES = 16 * MIB
CHECKPOINT_FILE_BYTES = 64 * 1024  # the small files of one checkpoint, each at least a filesystem block
# A checkpoint holds the trained tensors and AdamW's two moments of each; MLflow copies the tensors once more.
TENSOR_COPIES = 4
MIN_LABELS = 2  # the head's size is only known once a trial reads the task; a classifier has at least two


class OutputDiskFull(RuntimeError):
    """The output disk has no room for the search's next results; the message says what was kept and how to go on."""


@dataclasses.dataclass(frozen=True)
class OutputDisk:
    """The filesystem under a search's ``output_dir`` and the free space the search keeps there."""

    output_dir: Path
    concurrent_trials: int
    checkpoint_bytes: int  # one trial's checkpoint with its MLflow copy

    @classmethod
    def for_search(cls, config: ExperimentConfig, model_path: str | Path) -> OutputDisk:
        """Checkpoint size from the model's config.json and the largest prompt the search space allows."""
        model = json.loads((Path(model_path) / "config.json").read_text())
        hidden, layers = int(model["hidden_size"]), int(model["num_hidden_layers"])
        space = config.search_space
        prompt_rows = space.pre_seq_len.high * (1 + layers if "deep_ptune" in space.tuning_modes else 1)
        trained_floats = (prompt_rows + MIN_LABELS) * hidden
        checkpoint = TENSOR_COPIES * 4 * trained_floats + CHECKPOINT_FILE_BYTES
        return cls(config.output_dir, config.budget.max_concurrent_trials, checkpoint)

    @property
    def reserve_bytes(self) -> int:
        """Free space below which the next round might not fit: a checkpoint per running trial, and the stores."""
        return self.concurrent_trials * self.checkpoint_bytes + STORE_MARGIN_BYTES

    def with_checkpoint_seen(self, size: int) -> OutputDisk:
        """The same disk, reserving at least ``size`` per trial once a real checkpoint turned out that large."""
        if size <= self.checkpoint_bytes:
            return self
        return dataclasses.replace(self, checkpoint_bytes=size)

    def free_bytes(self) -> int:
        return shutil.disk_usage(_existing_ancestor(self.output_dir)).free

    def check_room_to_start(self) -> None:
        free = self.free_bytes()
        if free < self.reserve_bytes:
            raise OutputDiskFull(
                f"not enough free space to start the search: {self.output_dir} has {_size(free)} free and "
                f"the search needs at least {_size(self.reserve_bytes)} ({self._needs()}); free space there "
                "or set output_dir to a larger disk"
            )

    def full(self, what: str) -> OutputDiskFull:
        """The error for a search stopped by a full disk; ``what`` says what ran out."""
        return OutputDiskFull(
            f"the output disk is full: {what}. What the search stored stays: the MLflow runs and metrics of the "
            f"trials so far, the artifacts of the finished trials, and in {self.output_dir} the Optuna study "
            "(optuna.db) and Tune's checkpoints (ray/). Free space there and run the same command with --resume "
            "to continue."
        )

    def running_low(self) -> Optional[OutputDiskFull]:
        """The error to stop with when less than the reserve is free, else None."""
        free = self.free_bytes()
        if free >= self.reserve_bytes:
            return None
        return self.full(
            f"{self.output_dir} has {_size(free)} free, less than the {_size(self.reserve_bytes)} the search "
            f"keeps for its next round ({self._needs()}), so it stopped before a write could fail"
        )

    def _needs(self) -> str:
        return (
            f"{self.concurrent_trials} concurrent trials x {_size(self.checkpoint_bytes)} of checkpoint, "
            f"and {_size(STORE_MARGIN_BYTES)} for the stores"
        )


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in the exception chain, or sqlite's SQLITE_FULL (MLflow and Optuna stores)."""
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(link, sqlite3.Error) and getattr(link, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
    return False


@contextlib.contextmanager
def full_disk_reported(disk: OutputDisk) -> Iterator[None]:
    """Turn a full output disk, however it surfaces (Tune wraps callback errors, MLflow wraps sqlite's), into
    :class:`OutputDiskFull`; any error raised while less than the reserve is free is reported the same way."""
    try:
        yield
    except OutputDiskFull:
        raise
    except Exception as error:
        stopped = next((link for link in _chain(error) if isinstance(link, OutputDiskFull)), None)
        if stopped is not None:  # the search's own stop, wrapped on its way out of Tune
            raise OutputDiskFull(str(stopped)) from None
        if is_disk_full(error) or disk.free_bytes() < disk.reserve_bytes:
            what = f"{disk.output_dir} has {_size(disk.free_bytes())} free and the search failed: {_first_line(error)}"
            raise disk.full(what) from error
        raise


def tree_bytes(folder: str | Path) -> int:
    """Bytes of the regular files under ``folder``."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: Optional[BaseException] = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent: the disk a folder will be created on."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _size(count: int) -> str:
    return f"{count / MIB:.1f} MiB ({count} bytes)"
