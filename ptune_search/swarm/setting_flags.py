"""Settings declared once, as dataclass fields with a default and a help text; their command-line flags follow.

A field made with :func:`setting` is the flag ``--<field-name>`` (``_`` written ``-``) or the ``flag`` it
names; a field holding another settings dataclass adds that dataclass's flags, flattened. Parsing sets only
the flags given, over the defaults; :func:`setting_flags` writes settings back as flags (for a child process)::

    @dataclasses.dataclass(frozen=True)
    class Limits:
        max_tokens: int = setting(8192, help="largest batch * length accepted")

    add_setting_flags(parser, Limits)                                    # --max-tokens N
    limits = settings_from_flags(Limits(), parser.parse_args(["--max-tokens", "512"]))
    setting_flags(limits)                                                # ["--max-tokens", "512"]
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Collection, Iterator, Optional, Sequence, TypeVar

T = TypeVar("T")
FLAG_TYPES = (int, float, str, Path)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: Optional[str] = None,
    choices: Optional[Sequence[str]] = None,
) -> Any:
    """A dataclass field with its flag's help (and, when the field's name is not the flag, the flag)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclasses.dataclass(frozen=True)
class _Flag:
    path: tuple[str, ...]  # field names from the outer settings down to this one, e.g. ("limits", "max_tokens")
    flag: str
    kind: type
    field: dataclasses.Field

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


def _flags(cls: type, path: tuple[str, ...] = ()) -> Iterator[_Flag]:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = _flag_type(hints[field.name])
        if dataclasses.is_dataclass(kind):
            yield from _flags(kind, (*path, field.name))
            continue
        if "help" not in field.metadata:
            raise TypeError(f"{cls.__name__}.{field.name} is not declared with setting(): its flag has no help")
        if kind not in FLAG_TYPES:
            raise TypeError(f"{cls.__name__}.{field.name}: a flag takes {[t.__name__ for t in FLAG_TYPES]}")
        flag = field.metadata["flag"] or f"--{field.name.replace('_', '-')}"
        yield _Flag((*path, field.name), flag, kind, field)


def _flag_type(hint: Any) -> Any:
    """``Optional[X]`` (or ``X | None``) -> ``X``; other hints as they are."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return hint


def _excluded(path: tuple[str, ...], exclude: Collection[str]) -> bool:
    return any(".".join(path[:depth]) in exclude for depth in range(1, len(path) + 1))


def add_setting_flags(parser: argparse.ArgumentParser, cls: type, *, exclude: Collection[str] = ()) -> None:
    """Add a flag for every setting of ``cls`` but those named in ``exclude`` (``"listen"``, ``"limits.max_queue"``)."""
    defaults = cls()
    for flag in _flags(cls):
        if _excluded(flag.path, exclude):
            continue
        default = _value(defaults, flag.path)
        help_text = flag.field.metadata["help"] + (f" (default: {default})" if default is not None else "")
        choices = flag.field.metadata["choices"]
        parser.add_argument(flag.flag, dest=flag.dest, type=flag.kind, choices=choices, default=None, help=help_text)


def settings_from_flags(defaults: T, args: argparse.Namespace) -> T:
    """``defaults`` with the settings given as flags in ``args`` replaced (flags not given keep the defaults)."""
    return _replaced(defaults, {flag.path: getattr(args, flag.dest, None) for flag in _flags(type(defaults))})


def _replaced(settings: Any, given: dict[tuple[str, ...], Any], path: tuple[str, ...] = ()) -> Any:
    changes = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if dataclasses.is_dataclass(value):
            changes[field.name] = _replaced(value, given, (*path, field.name))
        elif given.get((*path, field.name)) is not None:
            changes[field.name] = given[(*path, field.name)]
    return dataclasses.replace(settings, **changes)


def setting_flags(settings: Any) -> list[str]:
    """The flags that rebuild ``settings`` through :func:`settings_from_flags`: those that differ from the defaults."""
    defaults = type(settings)()
    flags: list[str] = []
    for flag in _flags(type(settings)):
        value = _value(settings, flag.path)
        if value != _value(defaults, flag.path):
            if value is None:
                raise ValueError(
                    f"{'.'.join(flag.path)}=None cannot be written as {flag.flag}: leave it at its default"
                )
            flags += [flag.flag, str(value)]
    return flags


def _value(settings: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        settings = getattr(settings, name)
    return settings
