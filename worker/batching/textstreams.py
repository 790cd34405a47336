"""How the continuous batcher streams generated text: the hooks it drives.

The batcher drives a :class:`Streams` object: ``open`` gives a :class:`RequestStream` for
each prompt of a job that streams (None: this one does not); the batcher ``push``-es each
decoding step's new token ids into it, calls ``flush`` once per step with the jobs that got
tokens (sinks may deliver a step's pieces together), ``finish``-es a request when it ends
and ``close``-s the jobs once they end, before their records are stored.

:class:`JobTextStreams` (what workers use) drives the jobs' Redis text sinks
(``JobInFlight.text``, opened and closed by the route service) through one
``SequenceStream`` per request (``pipeq.worker.model.streamer``), as the static path's
batch streamer does per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from pipeq.worker.batching.jobs import JobInFlight
from pipeq.worker.model.generation import GenerationPlan
from pipeq.worker.model.streamer import SequenceStream, decode_options


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
