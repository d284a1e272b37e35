"""MLflow filter clauses for tag values that come from users (an ``output_dir`` may hold quotes).

MLflow's filter parser has no escape for a quote inside a string literal, so a value is written in the
quote it does not hold; a value holding both quotes is matched with ``LIKE`` (quotes as ``_`` wildcards)
and the caller keeps only the runs whose tag equals the value exactly (:func:`tagged`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from mlflow.exceptions import MlflowException
from mlflow.utils.search_utils import SearchUtils

if TYPE_CHECKING:
    from mlflow.entities import Run

LIKE_WILDCARDED = "'\"\\%_"  # characters a LIKE pattern replaces by ``_`` (any one character)


def tag_clause(key: str, value: str) -> str:
    """``tags.`key` = 'value'`` as MLflow reads it back, or a ``LIKE`` clause that matches a superset."""
    for quote in ("'", '"'):
        clause = f"tags.`{key}` = {quote}{value}{quote}"
        try:  # twice: a trailing backslash, say, parses alone but swallows the quote of a clause after it
            parsed = SearchUtils.parse_search_filter(f"{clause} and {clause}")
        except MlflowException:
            continue
        if [(item["key"], item["value"]) for item in parsed] == [(key, value)] * 2:
            return clause
    pattern = "".join("_" if char in LIKE_WILDCARDED else char for char in value)
    return f"tags.`{key}` LIKE '{pattern}'"


def tagged(runs: Iterable["Run"], tags: dict[str, str]) -> list["Run"]:
    """The runs whose tags equal ``tags`` exactly (after a search with :func:`tag_clause`)."""
    return [run for run in runs if all(run.data.tags.get(key) == value for key, value in tags.items())]
