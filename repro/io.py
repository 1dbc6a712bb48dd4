"""Files that are never seen half-written: atomic replace-on-write and JSON-lines append/read.

`atomic_path(path)` hands out a temporary name of this process's own (two writers of one file never share a
temporary), in the same folder; when the block ends without an error the data is fsynced and renamed over `path`,
so a reader sees the old file or the new one and a crash leaves at most a `*.tmp` file that nothing reads.
JSON-lines files are appended one short write per row, so a kill leaves whole lines plus at most one torn last
line, which `read_jsonl` skips.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


def temp_name(path: Path) -> Path:
    """This process's temporary name for `path`."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (a power cut could otherwise bring the old names back)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """`with atomic_path(p) as tmp: write tmp` -> `p` replaced by the complete file, or left as it was."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path | str, obj: Any) -> None:
    """JSON, atomically; objects JSON has no type for are written with str()."""
    write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def read_json(path: Path | str) -> Any | None:
    """Parsed JSON, or None when the file is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def append_jsonl(path: Path | str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")  # one short write: a kill leaves a whole line or none


def read_jsonl(path: Path | str) -> list[dict]:
    """The rows of a JSON-lines file (none when it is missing); a torn or foreign line is skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill; the rest is good
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_jsonl(path: Path | str, rows: list[dict]) -> None:
    """Replace a JSON-lines file with `rows`, atomically."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
