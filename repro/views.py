"""Render a list of row dicts as a rich table, tab-separated plain text or JSON, readable at any width.

A column is an identifier (experiment names, variants, hashes: what a user types or greps, never broken), a number
(never broken either) or prose (claims, errors: shortened with an ellipsis, and dropped, lowest priority first,
when the terminal is too narrow to show them usefully). `plain` is one line per row with a header line, fields
separated by tabs; `json` is one array of objects with the raw values. Neither depends on the terminal width.

`cli_console` and `progress_console` never wrap a log line or a progress line written to a file or a pipe, so each
stays one greppable line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

FORMATS = ("table", "plain", "json")
PROSE_MIN = 12          # a prose column narrower than this says too little to be worth its room
NOT_A_TERMINAL_WIDTH = 400  # progress bars into a file or a pipe: wide enough that nothing wraps


@dataclass(frozen=True)
class Column:
    key: str                         # the row dict's key; also the header of plain and the key of json
    header: str = ""                 # the table's header (default: key)
    kind: str = "id"                 # "id" | "num" | "prose"
    drop: int = 0                    # > 0: may be left out when too narrow, higher first (prose is shortened first)
    fmt: Callable[[Any], str] | None = None    # how a value reads in table and plain (default: str, "" for None)
    style: Callable[[Any], str] | None = None  # table only: a rich style per value (e.g. a status colour)
    missing: str = ""                # table only: what a missing value reads as (plain leaves it empty)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def cell(col: Column, value: Any) -> str:
    """A value as one line of text: tabs and newlines become single spaces."""
    if _missing(value):
        return ""
    return " ".join((col.fmt(value) if col.fmt else str(value)).split())


def _json_value(value: Any) -> Any:
    if _missing(value):
        return None
    if hasattr(value, "item"):  # numpy / pandas scalars
        value = value.item()
    return value if isinstance(value, (str, int, float, bool)) else str(value)


def to_plain(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A header line of column keys, then one tab-separated line per row."""
    lines = ["\t".join(c.key for c in columns)]
    lines += ["\t".join(cell(c, r.get(c.key)) for c in columns) for r in rows]
    return "\n".join(lines)


def to_json(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    return json.dumps([{c.key: _json_value(r.get(c.key)) for c in columns} for r in rows], indent=1)


def _fit(columns: Sequence[Column], texts: list[list[str]], width: int) -> dict[str, int]:
    """Width of every column that stays: identifiers and numbers at full width, prose shortened; when even that
    does not fit, columns with a `drop` priority are left out, highest first."""
    natural = {c.key: max([len(c.header or c.key)] + [len(row[i]) for row in texts])
               for i, c in enumerate(columns)}
    keep = list(columns)
    while True:
        overhead = 3 * len(keep) - 3  # a divider between columns, one space of padding each side, none at the edges
        prose = [c for c in keep if c.kind == "prose"]
        room = width - overhead - sum(natural[c.key] for c in keep if c.kind != "prose")
        if sum(natural[c.key] for c in prose) <= room:
            return {c.key: natural[c.key] for c in keep}
        droppable = [c for c in keep if c.kind == "prose" or c.drop]
        if room >= PROSE_MIN * len(prose) or not droppable:
            break
        keep.remove(max(droppable, key=lambda c: (c.drop, columns.index(c))))
    widths = {c.key: natural[c.key] for c in keep}
    short = sorted(prose, key=lambda c: natural[c.key])
    for i, c in enumerate(short):  # the narrowest first get what they need, the rest share what is left
        share = room // (len(short) - i)
        widths[c.key] = max(min(natural[c.key], share), min(PROSE_MIN, natural[c.key]))
        room -= widths[c.key]
    return widths


def to_table(rows: Sequence[dict], columns: Sequence[Column], width: int, *, caption: str | None = None) -> Table:
    """A rich table no wider than `width` whose identifier and number cells are never wrapped or cut."""
    texts = [[c.missing if _missing(r.get(c.key)) else cell(c, r.get(c.key)) for c in columns] for r in rows]
    widths = _fit(columns, texts, width)
    shown = [i for i, c in enumerate(columns) if c.key in widths]
    dropped = [c.header or c.key for c in columns if c.key not in widths]
    if dropped:
        note = f"not shown at this width: {', '.join(dropped)} (see --format plain)"
        caption = f"{caption}; {note}" if caption else note
    table = Table(caption=caption, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i in shown:
        c = columns[i]
        table.add_column(c.header or c.key, justify="right" if c.kind == "num" else "left", no_wrap=True,
                         width=widths[c.key], overflow="ellipsis" if c.kind == "prose" else "fold")
    for r, row_texts in zip(rows, texts):
        cells = []
        for i in shown:
            c, text = columns[i], escape(row_texts[i])
            style = c.style(r.get(c.key)) if c.style else None
            cells.append(f"[{style}]{text}[/]" if style and text else text)
        table.add_row(*cells)
    return table


def show(console: Console, rows: Sequence[dict], columns: Sequence[Column], fmt: str = "table", *,
         title: str | None = None, caption: str | None = None) -> None:
    """Print `rows` on `console` as a table (fitted to its width), plain text or JSON."""
    if fmt in ("plain", "json"):  # bytes as they are: rich would expand the tabs
        console.file.write((to_plain if fmt == "plain" else to_json)(rows, columns) + "\n")
        console.file.flush()
    elif fmt == "table":
        if title:  # its own line, never wrapped: it may hold a path
            console.print(title, style="italic", markup=False, soft_wrap=True)
        console.print(to_table(rows, columns, console.width, caption=caption), soft_wrap=False)
    else:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def cli_console(stderr: bool = False) -> Console:
    """The command line's console: printed lines are never wrapped (a log line stays one line); tables still fit
    the width (the terminal's, or COLUMNS, or 80 into a pipe)."""
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def progress_console(stderr: bool = False) -> Console:
    """A console for progress bars: rich's own on a terminal; into a file or a pipe, wide enough that the final
    state of a bar is one line."""
    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=NOT_A_TERMINAL_WIDTH)
