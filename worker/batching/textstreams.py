"""How the continuous batcher streams generated text: the hooks it drives, and one adapter.

The batcher drives a :class:`Streams` object: ``open`` gives a :class:`RequestStream` for
each prompt of a job that streams (None: this one does not); the batcher ``push``-es each
decoding step's new token ids into it, calls ``flush`` once per step with the jobs that got
tokens (sinks may deliver a step's pieces together), ``finish``-es a request when it ends
and ``close``-s the jobs once they end, before their records are stored.

That fits a token-level streamer (a ``SequenceStream`` per request that decodes and puts
into its job's sink) as well as :class:`TextSinkStreams`, which decodes here and gives
text pieces to a per-job :class:`TextSink` (``put(seq, text)`` / ``end()``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from pipeq.worker.batching.jobs import JobInFlight
from pipeq.worker.model.generation import GenerationPlan, IncrementalText

log = logging.getLogger("pipeq.batcher")


class RequestStream(Protocol):
    """One prompt's generated tokens as they come."""

    def push(self, token_ids: Sequence[int]) -> None:
        """The tokens this decoding step added."""

    def finish(self) -> None:
        """The request ended: nothing more comes."""


class Streams(Protocol):
    """Opens, flushes and closes the streams of a route's continuous jobs."""

    def open(self, job: JobInFlight, index: int, plan: GenerationPlan) -> RequestStream | None:
        """The stream of input ``index`` of ``job`` (None: it is not streamed)."""

    def flush(self, jobs: list[JobInFlight]) -> None:
        """A decoding step's tokens were pushed for ``jobs``: deliver what they made."""

    def close(self, jobs: list[JobInFlight]) -> None:
        """``jobs`` ended (whatever their outcome); their records are stored next."""


class TextSink(Protocol):
    """Where one job's generated text goes as it grows."""

    def put(self, seq: int, text: str) -> None:
        """The next piece of sequence ``seq`` (the input's index in the job)."""

    def end(self) -> None:
        """The job ended: no more pieces."""


class _DecodedStream:
    """A request's tokens decoded into text pieces for its job's sink."""

    def __init__(self, decode: Callable[[list[int]], str], sink: TextSink, seq: int):
        self.text = IncrementalText(decode)
        self.tokens: list[int] = []
        self.sink = sink
        self.seq = seq

    def push(self, token_ids: Sequence[int]) -> None:
        self.tokens.extend(token_ids)
        self._put(self.text.update(self.tokens))

    def finish(self) -> None:
        self._put(self.text.update(self.tokens, final=True))

    def _put(self, piece: str) -> None:
        if piece:
            self.sink.put(self.seq, piece)


class TextSinkStreams:
    """:class:`Streams` over per-job text sinks: ``sink_for(job)`` gives a job's sink (None:
    not streamed); pieces of each input join to its generated text (``IncrementalText``)."""

    def __init__(self, sink_for: Callable[[JobInFlight], TextSink | None],
                 decode: Callable[[list[int], GenerationPlan], str]):
        self.sink_for = sink_for
        self.decode = decode
        self._sinks: dict[str, TextSink | None] = {}

    def open(self, job: JobInFlight, index: int, plan: GenerationPlan) -> RequestStream | None:
        if job.job_id not in self._sinks:
            self._sinks[job.job_id] = self.sink_for(job)
        sink = self._sinks[job.job_id]
        if sink is None:
            return None
        return _DecodedStream(lambda tokens: self.decode(tokens, plan), sink, index)

    def flush(self, jobs: list[JobInFlight]) -> None:
        """Pieces were put as they came: nothing held."""

    def close(self, jobs: list[JobInFlight]) -> None:
        for job in jobs:
            sink = self._sinks.pop(job.job_id, None)
            if sink is not None:
                sink.end()
