"""The config reference, rendered from the typed config itself so that the docs cannot drift from it.

Every field of ``ExperimentConfig`` becomes a row (key, type, default, description), one table per section; the
descriptions are the fields' docstrings. The docs site renders it into docs/search.md at build time
(``docs/hooks.py``)::

    markdown = render_config_reference()
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ptune_search.config import ExperimentConfig

_SCALARS = {int: "integer", float: "number", str: "string", bool: "true / false", Path: "path"}
_TABLE_HEAD = ["| key | type | default | what it sets |", "|---|---|---|---|"]


def type_name(annotation: Any) -> str:
    """A reader's name for a field's type: ``integer or null``, ``list of ptune / deep_ptune``, ``{low, high}``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return " / ".join(str(arg) for arg in args)
    if origin in (Union, types.UnionType):
        named = [type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping {type_name(args[0])} -> {type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "{" + ", ".join(annotation.model_fields) + "}"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def default_text(field: FieldInfo) -> str:
    """The default as it is written in a YAML config."""
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, Path):
        value = str(value)
    return "null" if value is None else json.dumps(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def section_table(name: str, section: type[BaseModel]) -> list[str]:
    """The lines of one section: its heading, what it is for, and a row per key."""
    lines = [f"### `{name}`", "", _cell(section.__doc__ or ""), "", *_TABLE_HEAD]
    lines += [_row(key, field) for key, field in section.model_fields.items()]
    return [*lines, ""]


def _row(key: str, field: FieldInfo) -> str:
    cells = [f"`{key}`", _cell(type_name(field.annotation)), f"`{default_text(field)}`", _cell(field.description or "")]
    return "| " + " | ".join(cells) + " |"


def render_config_reference() -> str:
    """Markdown: the top-level keys, then one table per section, in the order a config file lists them."""
    fields = ExperimentConfig.model_fields
    lines = [*_TABLE_HEAD]
    lines += [_row(key, field) for key, field in fields.items() if not _is_section(field)]
    lines.append("")
    for key, field in fields.items():
        if _is_section(field):
            lines += section_table(key, field.annotation)
    return "\n".join(lines)


def _is_section(field: FieldInfo) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
