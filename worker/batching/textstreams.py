"""How the continuous batcher streams generated text: the hooks it drives, and one adapter.

The batcher drives a :class:`Streams` object: ``open`` gives a :class:`RequestStream` for
each prompt of a job that streams (None: this one does not); the batcher ``push``-es each
decoding step's new token ids into it, calls ``flush`` once per step with the jobs that got
tokens (sinks may deliver a step's pieces together), ``finish``-es a request when it ends
and ``close``-s the jobs once they end, before their records are stored.

:class:`JobTextStreams` (what workers use) drives the jobs' Redis text sinks
(``JobInFlight.text``, opened and closed by the route service) through one
``SequenceStream`` per request (``pipeq.worker.model.streamer``), as the static path's
batch streamer does per row; :class:`TextSinkStreams` decodes here and gives text pieces to
a per-job :class:`TextSink` (``put(seq, text)`` / ``end()``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pipeq.worker.batching.jobs import JobInFlight
from pipeq.worker.model.generation import GenerationPlan, IncrementalText
from pipeq.worker.model.streamer import SequenceStream, decode_options

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


class JobTextStreams:
    """:class:`Streams` over the jobs' own text sinks (``JobInFlight.text``: set by the route
    service for jobs submitted with ``stream=True``, closed by it when they end)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def open(self, job: JobInFlight, index: int, plan: GenerationPlan) -> RequestStream | None:
        if job.text is None:
            return None
        options = decode_options(self.tokenizer, job.request.params)
        return SequenceStream(self.tokenizer, options, job.text, index)

    def flush(self, jobs: list[JobInFlight]) -> None:
        for job in jobs:
            if job.text is not None:
                job.text.flush()

    def close(self, jobs: list[JobInFlight]) -> None:
        """The route service closes the jobs' streams with their records."""
