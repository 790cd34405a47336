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

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from pipeq.core.contract import JobState
from pipeq.core.redis_io import CONNECTION_ERRORS, async_connect
from pipeq.core.streams import StreamPiece, TextAssembler, parse_entry
from pipeq.errors import BrokerUnavailable, JobTimeout, StreamError

if TYPE_CHECKING:
    from pipeq.job import Job

#: Longest single XREAD block: the job's state is re-checked at least this often.
BLOCK_MS = 1000
#: Entries read per XREAD.
READ_COUNT = 1000


class StreamReader:
    """Reads one job's streamed text: call :meth:`step` until :attr:`done` (or, from
    asyncio, read with your own connection and hand each reply to :meth:`after_read`)."""

    def __init__(self, job: Job, timeout: float | None):
        self.job = job
        self.client = job.client
        self.key = self.client.keys.stream(job.id)
        self.assembler = TextAssembler(job.id)
        self.last_id: Any = "0-0"
        self.done = False
        self.waited = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._entries_seen = False

    def step(self) -> list[StreamPiece]:
        """The text of the next entries (waiting up to ``BLOCK_MS`` for some); sets
        :attr:`done` when the job has ended (raises its error if it did not succeed)."""
        block = self.block_ms()
        if block is None:
            self.timed_out()
        return self.after_read(self._xread(block))

    def block_ms(self) -> int | None:
        """How long the next read may block; None once the caller's timeout has passed."""
        if self.deadline is None:
            return BLOCK_MS
        left = self.deadline - time.monotonic()
        return None if left <= 0 else max(1, min(BLOCK_MS, int(left * 1000)))

    def after_read(self, reply: Any) -> list[StreamPiece]:
        """The pieces of an XREAD reply; after an empty one, the job's state decides
        whether the reading ends (a blocking Redis call)."""
        pieces = self._take(reply)
        if self.assembler.end is not None:
            self._finish(self.assembler.end)
        elif not pieces:
            self._check_state()
        return pieces

    def _xread(self, block_ms: int | None) -> Any:
        return self.client.call_redis(lambda: self.client.redis.xread(
            {self.key: self.last_id}, count=READ_COUNT, block=block_ms))

    def _take(self, reply: Any) -> list[StreamPiece]:
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
        self._take(self._xread(None))
        if self.assembler.end is None and not self._entries_seen and state == JobState.SUCCESS:
            raise StreamError(f"job {self.job.id} did not stream its text: submit it with "
                              "stream=True (remote.submit(..., stream=True) or "
                              "remote.stream(...)); job.result() gives its result")
        self._finish(state)

    def _finish(self, state: JobState) -> None:
        self.done = True
        # The record decides, not the end entry: a job cancelled while it ran was ended by
        # its worker as it ran, but its record says CANCELLED.
        self.job.raise_outcome()

    def timed_out(self) -> None:
        """Raise JobTimeout: the caller's timeout passed before the job ended."""
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


async def aiterate(job: Job, timeout: float | None) -> AsyncGenerator[StreamPiece, None]:
    """The job's pieces of text, awaited. The blocking reads run on an asyncio connection of
    the reader's own (no thread waits for text); the short state checks after an empty read
    run on the client's threads."""
    client = job.client
    settings = client.settings
    reader = StreamReader(job, timeout)
    conn = async_connect(settings, socket_timeout_s=settings.connect_timeout_s + BLOCK_MS / 1000,
                         single_connection_client=True)
    try:
        while not reader.done:
            block = reader.block_ms()
            if block is None:
                await client.offload(reader.timed_out)
            reply = await _aread(conn, reader, block, settings.connect_timeout_s)
            for piece in await client.offload(functools.partial(reader.after_read, reply)):
                yield piece
    finally:
        await conn.aclose()


async def _aread(conn: Any, reader: StreamReader, block: int | None, retry_s: float) -> Any:
    """One XREAD on the asyncio connection, retried while Redis is away (then
    BrokerUnavailable), as the client's own calls are."""
    deadline = time.monotonic() + retry_s
    delay = 0.05
    while True:
        try:
            return await conn.xread({reader.key: reader.last_id}, count=READ_COUNT, block=block)
        except CONNECTION_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise BrokerUnavailable(f"cannot read job {reader.job.id}'s stream from "
                                        f"Redis (retried {retry_s:g}s): {exc}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


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
