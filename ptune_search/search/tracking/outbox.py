"""A durable outbox of MLflow records, so that a store that does not answer loses nothing a search reported.

The Tune callback appends each record (a trial's run started, a result's metrics, a trial's end with its
artifacts, the search's summary) to a journal in the search's output directory and returns at once;
:class:`~ptune_search.search.tracking.sender.OutboxSender` writes the records to MLflow in order whenever the store
answers. Artifact files are copied in as the record is appended, because Tune deletes old checkpoints. A
record leaves the outbox once the store took it, or refused it for good: then it moves, with its files, to
``refused.jsonl`` and ``refused/`` beside the journal.

Records name trials by their Tune trial id, not by MLflow run id: run ids come from the store, which may not
answer when the record is written. The journal outlives the driver: a resumed search replays it first.

    outbox = TrackingOutbox.open(output_dir / "mlflow_outbox")
    outbox.append("finish_child", {"trial_id": "a_00001", "status": "FINISHED"}, [checkpoint / "head.safetensors"])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional

logger = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"
SENT_FILE = "sent.json"  # the sequence number of the last record the store took
FILES_DIR = "files"  # files/<seq>/<name>: artifacts of the records still waiting
REFUSED_FILE = "refused.jsonl"
REFUSED_DIR = "refused"


@dataclasses.dataclass(frozen=True)
class OutboxRecord:
    """One write for the store: ``operation`` with JSON ``args``, and artifact ``files`` held in the outbox."""

    seq: int
    operation: str
    args: dict[str, Any]
    files: tuple[Path, ...] = ()


class TrackingOutbox:
    """An append-only journal of records on their way to MLflow, safe to share between the driver's threads.

    Use :meth:`open` in a search: there is one outbox per directory in a process, and a Tune callback
    unpickled when a search is resumed attaches to it again instead of writing a second journal.
    """

    _open: ClassVar[dict[Path, TrackingOutbox]] = {}
    _open_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, directory: Path):
        self.directory = Path(directory).resolve()
        (self.directory / FILES_DIR).mkdir(parents=True, exist_ok=True)
        self._changed = threading.Condition()
        sent = self._read_sent()
        self._pending = [record for record in self._read_journal() if record.seq > sent]
        self._next_seq = max([sent, *(record.seq for record in self._pending)]) + 1
        self._rewrite_journal()  # drops a line torn by a crash mid-append, so new lines start clean

    @classmethod
    def open(cls, directory: Path | str) -> TrackingOutbox:
        resolved = Path(directory).resolve()
        with cls._open_lock:
            if resolved not in cls._open:
                cls._open[resolved] = cls(resolved)
            return cls._open[resolved]

    def __reduce__(self) -> tuple:
        return TrackingOutbox.open, (str(self.directory),)

    def append(self, operation: str, args: dict[str, Any], files: Iterable[Path] = ()) -> None:
        """Durable once this returns: the record and copies of ``files`` are on disk."""
        with self._changed:
            seq = self._next_seq
            copies = []
            for file in files:
                folder = self.directory / FILES_DIR / str(seq)
                folder.mkdir(parents=True, exist_ok=True)
                copies.append(Path(shutil.copy2(file, folder / Path(file).name)))
            record = OutboxRecord(seq, operation, args, tuple(copies))
            with open(self.directory / JOURNAL_FILE, "a", encoding="utf-8") as journal:
                journal.write(self._line(record))
                journal.flush()
                os.fsync(journal.fileno())
            self._next_seq += 1
            self._pending.append(record)
            self._changed.notify_all()

    def waiting(self) -> int:
        with self._changed:
            return len(self._pending)

    def first(self, timeout: float) -> Optional[OutboxRecord]:
        """The oldest record not yet taken, waiting up to ``timeout`` seconds for one to be appended."""
        with self._changed:
            self._changed.wait_for(lambda: bool(self._pending), timeout)
            return self._pending[0] if self._pending else None

    def wait_empty(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending, timeout)

    def taken(self, record: OutboxRecord) -> None:
        """The store has ``record``: it leaves the outbox, and the journal is emptied once nothing waits."""
        with self._changed:
            self._remove(record)
            shutil.rmtree(self.directory / FILES_DIR / str(record.seq), ignore_errors=True)

    def refused(self, record: OutboxRecord, reason: str) -> None:
        """The store will never take ``record`` (e.g. its run was deleted): kept aside with the reason."""
        with self._changed:
            folder = self.directory / FILES_DIR / str(record.seq)
            if folder.exists():
                (self.directory / REFUSED_DIR).mkdir(exist_ok=True)
                shutil.move(folder, self.directory / REFUSED_DIR / str(record.seq))
            entry = json.loads(self._line(record))
            entry["files"] = [f"{REFUSED_DIR}/{record.seq}/{file.name}" for file in record.files]
            with open(self.directory / REFUSED_FILE, "a", encoding="utf-8") as refused:
                refused.write(json.dumps({**entry, "reason": reason, "time": time.time()}) + "\n")
            self._remove(record)

    def _remove(self, record: OutboxRecord) -> None:
        assert self._pending and self._pending[0].seq == record.seq, "records leave the outbox in order"
        self._pending.pop(0)
        sent_tmp = self.directory / f"{SENT_FILE}.tmp"
        sent_tmp.write_text(json.dumps({"seq": record.seq}))
        os.replace(sent_tmp, self.directory / SENT_FILE)
        if not self._pending:
            (self.directory / JOURNAL_FILE).write_text("")
        self._changed.notify_all()

    def _line(self, record: OutboxRecord) -> str:
        files = [str(file.relative_to(self.directory)) for file in record.files]
        entry = {"seq": record.seq, "operation": record.operation, "args": record.args, "files": files}
        return json.dumps(entry) + "\n"

    def _read_sent(self) -> int:
        path = self.directory / SENT_FILE
        return int(json.loads(path.read_text())["seq"]) if path.exists() else 0

    def _read_journal(self) -> list[OutboxRecord]:
        path = self.directory / JOURNAL_FILE
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines) and not line.endswith("\n"):
                    logger.warning("%s: ignoring a last line torn by a crash mid-append", path)
                    break
                raise ValueError(f"{path}, line {number}: not a journal record; the outbox is damaged") from None
            files = tuple(self.directory / name for name in entry["files"])
            records.append(OutboxRecord(entry["seq"], entry["operation"], entry["args"], files))
        return records

    def _rewrite_journal(self) -> None:
        staged = self.directory / f"{JOURNAL_FILE}.tmp"
        staged.write_text("".join(self._line(record) for record in self._pending), encoding="utf-8")
        os.replace(staged, self.directory / JOURNAL_FILE)
