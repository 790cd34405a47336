"""Streamed generation text: the entries of a job's Redis Stream, written by workers and
read by producers, and the rules a reader follows to yield each piece of text exactly once.

A job submitted with ``stream=True`` gets a Redis Stream (``Keys.stream``) the worker
appends to as tokens are generated. Text entries carry::

    attempt  the job's start count when the text was made (1, then 2 after a re-delivery)
    index    the input the text belongs to (0 for a single input)
    seq      the returned sequence of that input (0 .. num_return_sequences - 1)
    at       the character offset of the piece in that sequence's text
    text     the piece

and one end entry closes the stream: ``attempt`` and ``end`` (the job's final state). The
offset makes every entry self-placing: a run that is re-done inside one attempt (a batch
split after an error) or a new attempt after a worker died rewrites text from offset 0,
and the reader, knowing what it has already yielded, yields only what extends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeq.core.contract import JobState
from pipeq.core.redis_io import as_text
from pipeq.errors import StreamError


@dataclass(frozen=True, slots=True)
class StreamPiece:
    """New text of one generated sequence: ``index`` is the input (its position in the
    list submitted), ``seq`` the returned sequence of that input (``num_return_sequences``)."""

    index: int
    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One entry of a job's stream, parsed: a piece of text, or the end (``end`` set)."""

    attempt: int
    index: int = 0
    seq: int = 0
    at: int = 0
    text: str = ""
    end: JobState | None = None


def text_fields(attempt: int, index: int, seq: int, at: int, text: str) -> dict[str, Any]:
    """The fields of a text entry (XADD)."""
    return {"attempt": attempt, "index": index, "seq": seq, "at": at, "text": text}


def end_fields(attempt: int, state: JobState) -> dict[str, Any]:
    """The fields of the entry that closes a job's stream."""
    return {"attempt": attempt, "end": state.value}


def parse_entry(fields: dict[Any, Any]) -> StreamEntry | None:
    """An entry read back (XREAD's field map, bytes or text); None if it is not one of ours."""
    values = {as_text(k): as_text(v) for k, v in fields.items()}
    try:
        attempt = int(values["attempt"])
        if "end" in values:
            return StreamEntry(attempt, end=JobState(values["end"]))
        return StreamEntry(attempt, int(values["index"]), int(values["seq"]),
                           int(values["at"]), values["text"])
    except (KeyError, ValueError):
        return None


class TextAssembler:
    """What a reader yields from a job's entries: each sequence's text once, never two
    attempts mixed.

    The rule: only the newest attempt seen counts (entries of older ones are ignored once a
    newer one appears). For each sequence the reader remembers the text it has yielded; an
    entry places its piece at its offset in the newest attempt's text, and the reader yields
    what that text adds beyond the yielded one. A retry that regenerates the same text
    (greedy decoding) therefore yields nothing until it passes the point where the dead
    attempt stopped, then continues it. A retry whose text differs from what was yielded
    (sampling) raises :class:`~pipeq.errors.StreamError`: text already shown cannot be
    taken back; ``job.result()`` has the final text.
    """

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.attempt = 0
        #: Text yielded so far, per (index, seq).
        self.yielded: dict[tuple[int, int], str] = {}
        #: The newest attempt's text, per (index, seq).
        self._current: dict[tuple[int, int], str] = {}
        #: The final state, once the end entry was read.
        self.end: JobState | None = None

    def add(self, entry: StreamEntry) -> list[StreamPiece]:
        """The new text ``entry`` makes yieldable (often none)."""
        if entry.attempt < self.attempt:
            return []  # a superseded attempt (its worker lost the job) is never mixed in
        if entry.attempt > self.attempt:
            self.attempt = entry.attempt
            self._current = {}
        if entry.end is not None:
            self.end = entry.end
            return []
        key = (entry.index, entry.seq)
        current = self._current.get(key, "")
        if entry.at > len(current):
            raise StreamError(
                f"job {self.job_id}: the start of its streamed text is gone (the stream is "
                "capped at PIPEQ_STREAM_MAXLEN entries and this reader came late); read the "
                "whole text with job.result()")
        current = current[:entry.at] + entry.text
        self._current[key] = current
        yielded = self.yielded.get(key, "")
        if current.startswith(yielded):
            if len(current) == len(yielded):
                return []
            self.yielded[key] = current
            return [StreamPiece(entry.index, entry.seq, current[len(yielded):])]
        if yielded.startswith(current):
            return []  # a retry catching up with what was already yielded
        raise StreamError(
            f"job {self.job_id}: its worker died mid-stream and the retry (attempt "
            f"{entry.attempt}) generated different text (sampling); the text streamed so far "
            "is void. job.result() gives the final text; stream with do_sample=False for a "
            "retry that continues the same text")
