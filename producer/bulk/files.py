"""Files of ``pipeq bulk``: input records (JSONL, text lines, CSV) and the ordered output.

Every input record has an index (0-based, in file order) and a line number. A record that
cannot be read (invalid JSON, a missing field or column, an empty line, bytes that are not
UTF-8) is a :class:`BadRecord`: it is answered with an error in the output, reported with its
line number, and is fatal only with ``--strict``.

The output is JSON Lines in input order, one line per input: ``{"index": i, "result": ...}``
or ``{"index": i, "error": {"type", "message", "retryable"}}``. It is written a chunk at a
time, flushed and fsynced, so a resumed run trusts every complete line it finds (``scan``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipeq.errors import ValidationError

FORMATS = ("jsonl", "text", "csv")
#: The error type that answers an unreadable input line.
BAD_INPUT = "BadInput"


@dataclass(frozen=True, slots=True)
class BadRecord:
    """An input record that could not be read; ``message`` names its line."""

    line: int
    message: str


@dataclass(frozen=True, slots=True)
class Record:
    """One input: its index, its line number, and its value (or why it is bad)."""

    index: int
    line: int
    value: Any


def guess_format(path: Path) -> str:
    """The input format suggested by a file name (``text`` when unsure)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    return "text"


def read_records(path: Path, fmt: str, *, field: str | None = None,
                 column: str | None = None) -> Iterator[Record]:
    """The records of an input file, read lazily."""
    if fmt == "jsonl":
        return _jsonl(path, field)
    if fmt == "text":
        return _text(path)
    if fmt == "csv":
        return _csv(path, column)
    raise ValidationError(f"unknown input format {fmt!r}; use one of {', '.join(FORMATS)}")


def count_records(path: Path, fmt: str) -> int:
    """How many records ``read_records`` will give (a quick pass over the file)."""
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as handle:
            return sum(1 for _ in csv.reader(handle))  # the header row is taken off by the caller
    count = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _lines(path: Path) -> Iterator[tuple[int, str | BadRecord]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, BadRecord(number, f"line {number}: not UTF-8 ({exc.reason} at byte "
                                                f"{exc.start})")
                continue
            yield number, text.rstrip("\r\n")


def _jsonl(path: Path, field: str | None) -> Iterator[Record]:
    name = field or "text"
    for index, (number, line) in enumerate(_lines(path)):
        if isinstance(line, BadRecord):
            yield Record(index, number, line)
            continue
        yield Record(index, number, _json_value(line, number, name, field is not None))


def _json_value(line: str, number: int, name: str, explicit: bool) -> Any:
    if not line.strip():
        return BadRecord(number, f"line {number}: empty line")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadRecord(number, f"line {number}: invalid JSON ({exc.msg} at column {exc.colno})")
    if isinstance(value, dict):
        if name not in value:
            fields = ", ".join(sorted(value)) or "none"
            return BadRecord(number, f"line {number}: no field {name!r} (fields: {fields}); "
                                     "choose one with --field")
        return value[name]
    if explicit:
        return BadRecord(number, f"line {number}: a JSON {type(value).__name__}, not an object "
                                 f"with field {name!r}")
    return value  # a bare JSON string (or other value) is the input itself


def _text(path: Path) -> Iterator[Record]:
    for index, (number, line) in enumerate(_lines(path)):
        if isinstance(line, str) and not line.strip():
            line = BadRecord(number, f"line {number}: empty line")
        yield Record(index, number, line)


def _csv(path: Path, column: str | None) -> Iterator[Record]:
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        position = _column_position(reader, column)
        for index, row in enumerate(reader):
            number = reader.line_num
            if position < len(row):
                value: Any = row[position]
            else:
                value = BadRecord(number, f"line {number}: no column {column or 0} "
                                          f"(the row has {len(row)})")
            yield Record(index, number, value)


def _column_position(reader: Any, column: str | None) -> int:
    """A column number (0-based; every row is data), or a header name (the first row)."""
    if column is None or column.isdigit():
        return int(column or 0)
    header = next(reader, None) or []
    if column not in header:
        raise ValidationError(f"CSV header has no column {column!r} (columns: {header})")
    return header.index(column)


def csv_has_header(column: str | None) -> bool:
    """True when ``--column`` names a header column (the first row is then no record)."""
    return column is not None and not column.isdigit()


@dataclass(frozen=True, slots=True)
class OutputState:
    """What a previous run left in the output file."""

    answered: int
    failed: int
    #: Inputs answered with a BadInput error (unreadable lines).
    bad: int
    #: Byte offset just after the last trusted line.
    size: int


def scan_output(handle: IO[bytes], chunk_size: int = 1, total: int | None = None
                ) -> OutputState:
    """Read an output file: its complete, in-order lines, kept to a multiple of a chunk size.

    A run killed mid-write may leave a torn last line; lines after the last whole chunk are
    not trusted either (their chunk is answered again), so the file resumes at a chunk boundary
    (or at its end, when every one of ``total`` inputs is answered).
    """
    handle.seek(0)
    failed = bad = size = 0
    boundary = whole = OutputState(0, 0, 0, 0)
    for index, raw in enumerate(handle):
        if not raw.endswith(b"\n"):
            break
        try:
            line = json.loads(raw)
            ok = line["index"] == index and ("result" in line or "error" in line)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            break
        if "error" in line:
            failed += 1
            bad += isinstance(line["error"], dict) and line["error"].get("type") == BAD_INPUT
        size += len(raw)
        whole = OutputState(index + 1, failed, bad, size)
        if whole.answered % chunk_size == 0:
            boundary = whole
    return whole if whole.answered == total else boundary


class OutputWriter:
    """Appends answers to the output file in order; each chunk is flushed and fsynced."""

    def __init__(self, handle: IO[bytes], next_index: int):
        self.handle = handle
        self.next_index = next_index

    def write_chunk(self, start: int, answers: list[tuple[str, Any]]) -> None:
        """Write one chunk's answers: ("result", value) or ("error", {...}) per input."""
        if start != self.next_index:
            raise RuntimeError(f"output out of order: chunk at {start}, expected {self.next_index}")
        buffer = io.StringIO()
        for offset, (kind, value) in enumerate(answers):
            buffer.write(json.dumps({"index": start + offset, kind: value}, ensure_ascii=False,
                                    separators=(",", ":"), default=_plain))
            buffer.write("\n")
        self.handle.write(buffer.getvalue().encode("utf-8"))
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.next_index = start + len(answers)


def _plain(value: Any) -> Any:
    """JSON for what json cannot write itself: arrays (``return_tensors=True``) become lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")
