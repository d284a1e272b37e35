"""Where a search's output goes: its progress and summary to the console, the libraries' chatter to a log file.

Ray, hivemind, transformers, Optuna and MLflow each log through a handler of their own on stderr, and Python
warnings print there too; during a search all of them write to ``output_dir/search.log`` instead. The
project's own warnings still reach the console (and the file), so a problem the user must act on is seen.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

LOG_FILE = "search.log"
LIBRARY_LOGGERS = ("ray", "hivemind", "transformers", "optuna", "mlflow", "alembic", "py.warnings")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def library_logs_to_file(output_dir: Path) -> Iterator[Path]:
    """Send the libraries' and the root logger's records to ``output_dir/search.log`` while the search runs;
    yields the file's path. Every logger is restored on exit."""
    path = output_dir / LOG_FILE
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(LOG_FORMAT))
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setLevel(logging.WARNING)
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    project = logging.getLogger("ptune_search")
    rerouted = [logging.getLogger(name) for name in LIBRARY_LOGGERS] + [logging.root]
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in rerouted + [project]]
    root_level = logging.root.level
    try:
        for logger in rerouted:
            logger.handlers = [to_file]
        logging.getLogger("py.warnings").propagate = False
        logging.root.setLevel(logging.INFO)
        project.handlers, project.propagate = [to_file, to_console], False
        logging.captureWarnings(True)
        yield path
    finally:
        logging.captureWarnings(False)
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        logging.root.setLevel(root_level)
        to_file.close()
