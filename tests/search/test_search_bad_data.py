"""A task file the search cannot use fails in the driver before anything starts; a search whose every
trial fails ends with one summary naming the first error."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.search.search_process import assert_no_survivors

LABELS = ("sport", "politics", "tech")


def _csv(path: Path, rows: list[tuple[str, str]], encoding: str = "utf-8", header=("text", "label")) -> Path:
    with path.open("w", newline="", encoding=encoding) as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _rows(count: int) -> list[tuple[str, str]]:
    return [(f"article number {index} about {LABELS[index % 3]}", LABELS[index % 3]) for index in range(count)]


BAD_FILES = {
    "latin-1": (
        lambda p: _csv(p, [*_rows(300), ("Prices rose by £5", "tech")], encoding="latin-1"),
        "is not UTF-8 text",
    ),
    "empty text": (
        lambda p: _csv(p, [*_rows(150), ("", "tech"), *_rows(150), ("  ", "sport")]),
        "2 of 302 rows have an empty or invalid text or label (lines 152, 303)",
    ),
    "no rows": (lambda p: _csv(p, []), "has no examples"),
    "missing column": (lambda p: _csv(p, _rows(300), header=("body", "label")), "no column 'text'"),
    "one label": (lambda p: _csv(p, [(text, "tech") for text, _ in _rows(300)]), "1 class ['tech']"),
    "too few rows": (lambda p: _csv(p, _rows(120)), "does not fit the 120 examples"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_task_file_fails_with_exit_2_before_anything_starts(run_search, tmp_path, kind):
    write, message = BAD_FILES[kind]
    path = write(tmp_path / "task.csv")
    # tiny.yaml asks for 200 training and 50 validation examples; 100 are held out for the test split
    search = run_search([f"task.name={path}", "task.test_size=50"])
    assert search.wait(timeout=120) == 2, search.log()[-3000:]
    log = search.log()
    assert message in log and f"task {path}" in log, log[-3000:]
    assert "Traceback" not in log
    assert not search.seen, f"a bad task file started processes: {search.seen}"
    assert not (tmp_path / "search").exists()


def test_label_words_for_classes_the_task_lacks_fail_with_exit_2_before_anything_starts(run_search, tmp_path):
    search = run_search(["task.label_words={sport: S}", "search_space.heads=[label_words]"])
    assert search.wait(timeout=120) == 2, search.log()[-3000:]
    log = search.log()
    assert "task.label_words: label words are given for ['sport'], which are not classes of the task" in log
    assert "Traceback" not in log
    assert not search.seen, f"bad label words started processes: {search.seen}"


def test_skip_invalid_rows_drops_them_with_a_warning(tmp_path):
    from ptune_search.data import TaskSpec, split_task

    path = _csv(tmp_path / "task.csv", [*_rows(150), ("", "tech"), *_rows(150)])
    splits = split_task(TaskSpec(str(path), skip_invalid_rows=True), 200, 50, 50, seed=0)
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 300


@pytest.mark.slow
def test_a_search_whose_every_trial_fails_ends_with_one_summary(run_search, tmp_path):
    # the tiny model's byte-level vocabulary has fewer than 300 tokens: every trial's 'vocab' init raises
    search = run_search(
        [
            "search_space.prompt_init=[vocab]",
            "search_space.pre_seq_len.low=300",
            "search_space.pre_seq_len.high=301",
            "budget.num_samples=2",
            "budget.max_failures=0",
            "baseline=false",
        ]
    )
    assert search.wait(timeout=600) == 1, search.log()[-3000:]
    last_line = search.log().strip().splitlines()[-1]
    assert last_line.startswith("ptune-search search: error: no trial finished its budget (2 of 2 failed)")
    assert "the first trial error: ValueError: prompt init 'vocab' needs 30" in last_line
    assert "trial_rows" not in search.log() and "AttributeError" not in search.log()
    assert_no_survivors(search)
