"""``pipeq bulk``'s files: input records with line numbers, and what a resumed run trusts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeq.bulk.chunks import MISSING, ItemError
from pipeq.bulk.files import (
    BadRecord,
    OutputWriter,
    count_records,
    guess_format,
    read_records,
    scan_output,
)
from pipeq.bulk.mapping import chunked
from pipeq.errors import ValidationError


def _values(path: Path, fmt: str, **kwargs: str) -> list[object]:
    return [r.value for r in read_records(path, fmt, **kwargs)]


def test_jsonl_records_keep_their_index_and_report_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "a"}\n{oops\n\n"bare string"\n{"body": "b"}\n\xff\xfe\n'
                     b'{"text": {"text": "x", "text_pair": "y"}}')
    records = list(read_records(path, "jsonl"))
    assert [(r.index, r.line) for r in records] == [(i, i + 1) for i in range(7)]
    values = [r.value for r in records]
    assert values[0] == "a" and values[3] == "bare string"
    assert values[6] == {"text": "x", "text_pair": "y"}
    bad = {i: v.message for i, v in enumerate(values) if isinstance(v, BadRecord)}
    assert bad == {
        1: "line 2: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        2: "line 3: empty line",
        4: "line 5: no field 'text' (fields: body); choose one with --field",
        5: "line 6: not UTF-8 (invalid start byte at byte 0)",
    }
    assert count_records(path, "jsonl") == 7
    assert _values(path, "jsonl", field="body")[4] == "b"


def test_text_and_csv_records(tmp_path: Path) -> None:
    text = tmp_path / "in.txt"
    text.write_text("one\n\ntwo\r\n")
    assert _values(text, "text")[0::2] == ["one", "two"]
    assert isinstance(_values(text, "text")[1], BadRecord)
    table = tmp_path / "in.csv"
    table.write_text('id,body\n1,"hello, world"\n2,"two\nlines"\n3\n')
    assert _values(table, "csv", column="body")[:2] == ["hello, world", "two\nlines"]
    short = _values(table, "csv", column="body")[2]
    assert isinstance(short, BadRecord) and short.message.startswith("line 5: no column body")
    assert _values(table, "csv", column="0") == ["id", "1", "2", "3"]
    with pytest.raises(ValidationError, match="no column 'text'"):
        _values(table, "csv", column="text")
    assert (guess_format(table), guess_format(text), guess_format(tmp_path / "a.jsonl")) == (
        "csv", "text", "jsonl")


def test_resume_trusts_whole_chunks_of_in_order_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with open(path, "a+b") as handle:
        writer = OutputWriter(handle, 0)
        writer.write_chunk(0, [("result", 1), ("error", {"type": "BadInput", "message": "m"})])
        writer.write_chunk(2, [("result", 3), ("error", {"type": "Boom", "message": "m"})])
        writer.write_chunk(4, [("result", 5)])
        handle.write(b'{"index": 5, "resu')  # torn by a kill
        handle.flush()
        state = scan_output(handle, chunk_size=2)
        assert (state.answered, state.failed, state.bad) == (4, 2, 1)
        assert state.size == len(b"".join(path.read_bytes().splitlines(keepends=True)[:4]))
        # Every input answered (the last chunk is short): the whole file is kept.
        handle.truncate(state.size + len(path.read_bytes().splitlines(keepends=True)[4]))
        assert scan_output(handle, chunk_size=2, total=5).answered == 5
        with pytest.raises(RuntimeError, match="out of order"):
            writer.write_chunk(9, [("result", 0)])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[1] == {"index": 1, "error": {"type": "BadInput", "message": "m"}}


def test_chunked_reads_lazily_and_numbers_chunks() -> None:
    taken = []

    def source() -> Iterator[int]:
        for i in range(10):
            taken.append(i)
            yield i

    chunks = chunked(source(), 4)
    first = next(chunks)
    assert (first.number, first.start, first.items, len(taken)) == (0, 0, [0, 1, 2, 3], 4)
    rest = list(chunks)
    assert [(c.number, c.start, c.items) for c in rest] == [(1, 4, [4, 5, 6, 7]), (2, 8, [8, 9])]
    assert first.answers == [MISSING] * 4 and not first.complete
    first.answers = [1, ItemError("E", "m"), 3, 4]
    assert first.complete and first.failures == 1
