"""The driver's background writer: replays a tracking outbox into MLflow, in order, whenever the store answers.

The Tune loop never waits for MLflow: it appends to the outbox, and this thread does the talking, with its
own backoff while the store is down. A write whose outcome is unknown (the connection broke mid-call) is
sent again; the writer's records are idempotent, and it re-reads what the store holds before resending
metrics, so each step is logged once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional, Protocol

from mlflow.exceptions import MlflowException

from ptune_search.search.tracking.outbox import OutboxRecord, TrackingOutbox

logger = logging.getLogger(__name__)


class RecordWriter(Protocol):
    tracking_uri: str

    def write(self, record: OutboxRecord) -> None:
        """Apply ``record`` to the store; sending the same record again must change nothing."""

    def forget_store_state(self) -> None:
        """After a failed write: what the writer believed the store holds may be wrong; read it again."""


class StoreUnreachable(ConnectionError):
    """MLflow did not take the outbox in time; the records stay on disk for ``--resume``."""


# Answers that mean the store is up and will never take the record (a deleted run, a changed param); any
# other error (no connection, a timeout, 5xx, 429, a locked sqlite file) may pass, so the record waits.
REFUSAL_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"})


def is_refusal(error: BaseException) -> bool:
    return isinstance(error, MlflowException) and error.error_code in REFUSAL_CODES


class OutboxSender:
    """A daemon thread that writes an outbox's records through ``writer``; use it as a context manager.

    Args:
        outbox: the records to send, oldest first.
        writer: applies one record to the store (e.g. :class:`~ptune_search.search.tracking.records.SearchTracker`).
        min_backoff_s, max_backoff_s: wait after a failed write, doubled after each failure in a row.
    """

    def __init__(
        self, outbox: TrackingOutbox, writer: RecordWriter, min_backoff_s: float = 1.0, max_backoff_s: float = 15.0
    ):
        self.outbox = outbox
        self.writer = writer
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.last_error: Optional[BaseException] = None  # None while the store answers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-outbox-sender", daemon=True)

    def __enter__(self) -> OutboxSender:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Records still waiting stay in the journal; a write stuck in a dead connection is left to its timeout."""
        self._stop.set()
        self._thread.join(timeout=10)

    def flush(self, timeout_s: float, progress_every_s: float = 15.0) -> bool:
        """Wait until the outbox is empty (True) or ``timeout_s`` passed (False), saying why while the store is down."""
        deadline = time.monotonic() + timeout_s
        next_progress = time.monotonic()
        while not self.outbox.wait_empty(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
            now = time.monotonic()
            if now >= deadline:
                return False
            if self.last_error is not None and now >= next_progress:
                print(
                    f"MLflow at {self.writer.tracking_uri} unreachable, {self.outbox.waiting()} operations waiting; "
                    f"retrying for up to {deadline - now:.0f} s more",
                    flush=True,
                )
                next_progress = now + progress_every_s
        return True

    def _run(self) -> None:
        backoff = self.min_backoff_s
        while not self._stop.is_set():
            record = self.outbox.first(timeout=1.0)
            if record is None:
                continue
            try:
                self.writer.write(record)
            except Exception as error:  # whatever the store or the network raised: the record waits
                if is_refusal(error):
                    logger.error(
                        "MLflow at %s refused %s record %d for good (%s); kept in %s",
                        self.writer.tracking_uri,
                        record.operation,
                        record.seq,
                        error,
                        self.outbox.directory,
                    )
                    self.outbox.refused(record, str(error))
                    continue
                self.writer.forget_store_state()
                if self.last_error is None:
                    logger.warning(
                        "MLflow at %s unreachable (%s); %d operations wait in %s, retrying",
                        self.writer.tracking_uri,
                        _short(error),
                        self.outbox.waiting(),
                        self.outbox.directory,
                    )
                self.last_error = error
                self._stop.wait(backoff)
                backoff = min(2 * backoff, self.max_backoff_s)
                continue
            if self.last_error is not None:
                logger.warning(
                    "MLflow at %s answers again; sending the %d waiting operations",
                    self.writer.tracking_uri,
                    self.outbox.waiting(),
                )
            self.last_error, backoff = None, self.min_backoff_s
            self.outbox.taken(record)


def _short(error: BaseException) -> str:
    text = str(error)
    return text if len(text) <= 300 else text[:300] + "..."
