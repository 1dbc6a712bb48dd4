"""Declared tables: a dataclass field carries its allowed values once, and one checker applies them to a value
from any source (a TOML file, `--set`, code), with a one-line error that names the file, the table and the key.

`spec(...)` declares a field (default, `choices` or a `valid` test with its requirement in words, `help`, whether it
enters the config hash); `check(key, field, value)` applies choices and the test; `read_table(cls, raw, ...)`
checks a whole TOML table against a dataclass: unknown keys (with a close match), missing required keys, types and
allowed values. The config (repro.config), the scales (repro.scales) and the experiment files (repro.experiments)
are declared with it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable

from repro.errors import UserError

REQUIRED = dataclasses.MISSING


def spec(default: Any = REQUIRED, *, choices: tuple | None = None, hash: bool = True, help: str = "",
         valid: tuple[Callable[[Any], bool], str] | None = None, factory: Callable[[], Any] | None = None,
         derived: bool = False) -> Any:
    """A declared field. `choices` or `valid` (a test and what it requires, in words: "must be at least 1") is the
    one place its allowed values are written; a field without a default (and no `factory`) is required; a
    `derived` field is filled in by code, never read from a table."""
    meta = {"choices": choices, "hash": hash, "help": help, "valid": valid, "derived": derived}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if default is REQUIRED:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check(key: str, f: dataclasses.Field, value: Any) -> None:
    """Raise the one-line UserError for a value that the field does not allow."""
    choices, valid = f.metadata.get("choices"), f.metadata.get("valid")
    if choices and value not in choices:
        raise UserError(f"{key} = {value!r} is not one of {', '.join(map(str, choices))}")
    if valid and not valid[0](value):
        raise UserError(f"{key} = {value!r} {valid[1]}")


def unknown_key(where: str, key: str, known) -> UserError:
    """`where`: unknown key `key`, with the closest known one or the whole list."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(known)}"
    return UserError(f"{where}unknown key {key!r}{hint}")


def table_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of `cls` that a table may set (all but the derived ones)."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}


def _base_type(annotation: Any) -> Any:
    """`str | None` -> str; `tuple[str, ...]` -> tuple; `dict[str, Any]` -> dict."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return typing.get_origin(annotation) or annotation


TYPE_WORDS = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
              tuple: "a list of strings", list: "a list of strings", dict: "a table"}


def type_ok(typ: type, value: Any) -> bool:
    """Whether a TOML value has the declared type (a bool is not a number; an int is a float; a list of strings)."""
    if typ is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if typ is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if typ in (tuple, list):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, typ)


def read_table(cls: type, raw: Any, *, path: Path | str, where: str = "",
               extra: Callable[[str], bool] | None = None, partial: bool = False, hint: str = "") -> dict[str, Any]:
    """Check the TOML table `raw` against dataclass `cls`; return its declared keys (lists as tuples) and, where
    `extra(key)` allows, the other keys unchanged. `where` names the table in errors ("[page] ", "" at top level);
    `partial`: no key is required (a table that overrides another); `hint` ends the missing-key message."""
    if not isinstance(raw, dict):
        raise UserError(f"{path}: {where.strip() or 'the file'} = {raw!r} must be a table")
    fields = table_fields(cls)
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            if extra is not None and extra(key):
                out[key] = value
                continue
            raise unknown_key(f"{path}: {where}", key, fields)
        f, typ = fields[key], _base_type(hints[key])
        valid = f.metadata.get("valid")
        if not type_ok(typ, value):
            raise UserError(f"{path}: {where}{key} = {value!r} {valid[1] if valid else 'must be ' + TYPE_WORDS[typ]}")
        try:
            for item in value if typ in (tuple, list) else [value]:  # a list's choices apply to each item
                check(f"{where}{key}", f, item)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        out[key] = tuple(value) if typ is tuple else value
    for key, f in fields.items() if not partial else ():
        if key not in out and f.default is REQUIRED and f.default_factory is REQUIRED:
            raise UserError(f"{path}: {where.strip() + ' ' if where else ''}missing required key {key!r}{hint}")
    return out


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per declared field: `prefix+name = default (choices)  help`."""
    lines = []
    for f in table_fields(cls).values():
        default = f.default if f.default is not REQUIRED else ("required" if f.default_factory is REQUIRED
                                                                 else f.default_factory())
        choices = f.metadata.get("choices")
        extra = f" ({'|'.join(map(str, choices))})" if choices else ""
        lines.append(f"{prefix}{f.name} = {default!r}{extra}  {f.metadata.get('help', '')}".rstrip())
    return lines
