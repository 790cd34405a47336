"""Reading a streaming job's generated text as it is made (``Job.stream``, ``remote.stream``).

A :class:`StreamReader` follows one job's Redis Stream with ``XREAD BLOCK`` (at most
``BLOCK_MS`` at a time) and feeds the entries to a
:class:`~pipeq.core.streams.TextAssembler`, which yields each piece of text once and never
mixes two attempts of the job (see its rule). Whenever a read comes back empty the reader
looks at the job's state: a job that ended without closing its stream (cancelled while
queued, its record lost) ends the reading too, so a reader never hangs on a dead job; a job
still running (or waiting for a retry after its worker died) is waited for, up to the
caller's timeout. The stream ends with the job: on SUCCESS the iteration stops, otherwise
it raises the job's error as ``job.result()`` would.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from pipeq.core.contract import JobState
from pipeq.core.streams import StreamPiece, TextAssembler, parse_entry
from pipeq.errors import JobTimeout, StreamError

if TYPE_CHECKING:
    from pipeq.job import Job

#: Longest single XREAD block: the job's state is re-checked at least this often.
BLOCK_MS = 1000
#: Entries read per XREAD.
READ_COUNT = 1000


class StreamReader:
    """Reads one job's streamed text: call :meth:`step` until :attr:`done`."""

    def __init__(self, job: Job, timeout: float | None):
        self.job = job
        self.client = job.client
        self.key = self.client.keys.stream(job.id)
        self.assembler = TextAssembler(job.id)
        self.last_id = "0-0"
        self.done = False
        self.waited = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._entries_seen = False

    def step(self) -> list[StreamPiece]:
        """The text of the next entries (waiting up to ``BLOCK_MS`` for some); sets
        :attr:`done` when the job has ended (raises its error if it did not succeed)."""
        block = BLOCK_MS
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self._timed_out()
            block = max(1, min(block, int(left * 1000)))
        pieces = self._read(block)
        if self.assembler.end is not None:
            self._finish(self.assembler.end)
        elif not pieces:
            self._check_state()
        return pieces

    def _read(self, block_ms: int | None) -> list[StreamPiece]:
        reply: Any = self.client.call_redis(lambda: self.client.redis.xread(
            {self.key: self.last_id}, count=READ_COUNT, block=block_ms))
        pieces: list[StreamPiece] = []
        for _, entries in reply or ():
            for entry_id, fields in entries:
                self.last_id = entry_id
                self._entries_seen = True
                entry = parse_entry(fields)
                if entry is not None:
                    pieces.extend(self.assembler.add(entry))
                if self.assembler.end is not None:
                    return pieces
        return pieces

    def _check_state(self) -> None:
        """After an empty read: end the reading if the job has ended without an end entry."""
        (state,) = self.client.call_redis(lambda: self.client.store.states([self.job.id]))
        if state is None:
            raise self.job.not_found()
        if not state.is_final:
            return
        # Its end entry may have been written between the read and the state check.
        self._read(None)
        if self.assembler.end is None and not self._entries_seen and state == JobState.SUCCESS:
            raise StreamError(f"job {self.job.id} did not stream its text: submit it with "
                              "stream=True (remote.submit(..., stream=True) or "
                              "remote.stream(...)); job.result() gives its result")
        self._finish(state)

    def _finish(self, state: JobState) -> None:
        self.done = True
        if state != JobState.SUCCESS:
            self.job.raise_outcome()

    def _timed_out(self) -> None:
        (state,) = self.client.call_redis(lambda: self.client.store.states([self.job.id]))
        shown = state.value if state else "unknown"
        raise JobTimeout(
            f"job {self.job.id} did not finish streaming within {self.waited:g}s (status "
            f"{shown}); read on with job.stream(timeout=...) (text already read is yielded "
            "again) or cancel it", job_id=self.job.id, waited_s=self.waited or 0.0,
            state=shown)


def iterate(job: Job, timeout: float | None) -> Iterator[StreamPiece]:
    """The job's pieces of text, as they come (blocking)."""
    reader = StreamReader(job, timeout)
    while not reader.done:
        yield from reader.step()


async def aiterate(job: Job, timeout: float | None) -> AsyncIterator[StreamPiece]:
    """The job's pieces of text, awaited: each read runs on the client's own threads."""
    reader = StreamReader(job, timeout)
    while not reader.done:
        for piece in await job.client.offload(reader.step):
            yield piece


def plain(pieces: Iterator[StreamPiece]) -> Iterator[str]:
    """Only the text (one input, one sequence)."""
    for piece in pieces:
        yield piece.text


async def aplain(pieces: AsyncIterator[StreamPiece]) -> AsyncIterator[str]:
    """Only the text (one input, one sequence), awaited."""
    async for piece in pieces:
        yield piece.text


def yields_plain_text(single: bool, params: dict[str, Any]) -> bool:
    """True when a stream yields str: one prompt, one returned sequence."""
    return single and params.get("num_return_sequences", 1) == 1
