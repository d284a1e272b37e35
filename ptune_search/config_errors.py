"""What a user reads when a config is wrong: one line per broken rule, ``<dotted.path>: <value> is not allowed:
<rule>``, rendered from pydantic's errors.

Rules the schema's own validators check raise ``RuleBroken``, which names the field and may name sibling fields by
their full dotted path::

    raise RuleBroken(("eval_every",), "5 is not allowed: must be <= {section}max_steps (4)")
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

MAX_SHOWN = 100  # characters of a value quoted in an error


class ConfigError(ValueError):
    """An invalid experiment config; ``problems`` holds one line per broken field, each naming its dotted path."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class RuleBroken(ValueError):
    """A rule broken at ``loc`` (relative to where the validator runs), with the message after ``<path>: ``.

    ``{section}`` in the message becomes the validator's dotted prefix, so a rule can name sibling fields by
    their full path (``must be <= budget.max_steps``) without the section knowing where it sits.
    """

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def describe_error(detail: Mapping[str, Any], root: type[BaseModel]) -> str:
    """One line for one pydantic error: ``<dotted.path>: <value> is not allowed: <rule>``."""
    loc, kind, value = tuple(detail["loc"]), detail["type"], detail.get("input")
    ctx = detail.get("ctx") or {}
    error = ctx.get("error")
    if kind == "string_unicode" and isinstance(value, str):  # a key that is not valid text, reported at its parent
        loc, kind = (*loc, value), "invalid_key"
    if isinstance(error, RuleBroken):
        section = dotted(loc)
        prefix = f"{section}." if section else ""
        return f"{dotted((*loc, *error.loc))}: {error.message.replace('{section}', prefix)}"
    if kind in ("extra_forbidden", "invalid_key"):
        parent, key = loc[:-1], str(loc[-1])
        allowed = list(_section_model(root, parent).model_fields)
        path = dotted((*parent, key))
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{path}: unknown field; allowed: {', '.join(allowed)}{hint}"
    if kind == "missing":
        return f"{dotted(loc)}: missing; this field is required"
    return f"{dotted(loc)}: {show_value(value)} is not allowed: {_rule(kind, ctx, root, loc, str(detail['msg']))}"


def _rule(kind: str, ctx: Mapping[str, Any], root: type[BaseModel], loc: tuple[Any, ...], message: str) -> str:
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        return f"must be {bounds[kind]} {next(iter(ctx.values()))}"
    if kind == "model_type":
        return f"must be a mapping with keys {', '.join(_section_model(root, loc).model_fields)}"
    rules = {
        "int_type": "must be an integer",
        "float_type": "must be a number",
        "finite_number": "must be a finite number",
        "string_type": "must be a string",
        "string_too_short": "must not be empty",
        "bool_type": "must be true or false",
        "list_type": "must be a list",
        "too_short": "must not be empty",
        "path_type": "must be a path",
    }
    if kind in rules:
        return rules[kind]
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind == "value_error":
        return str(ctx["error"])
    return message[:1].lower() + message[1:]


def _section_model(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model class of the section at ``loc`` (``()`` is ``root``, the whole config)."""
    model = root
    for key in loc:
        model = model.model_fields[key].annotation  # type: ignore[assignment]  # sections are plain model fields
    return model


def dotted(loc: tuple[Any, ...]) -> str:
    path = ""
    for key in loc:
        path += f"[{key}]" if isinstance(key, int) else (f".{key}" if path else str(key))
    return path


def show_value(value: Any) -> str:
    """A value as a user wrote it in YAML flow style (null, true, "text", [1, 2]), shortened."""
    try:
        shown = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        shown = repr(value)
    return shown if len(shown) <= MAX_SHOWN else shown[: MAX_SHOWN - 3] + "..."
