"""Jobs inside the worker: a job in flight (its request, outputs, outcome and completion
signal) and the slots its inputs wait in for a batch."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from pipeq.core.contract import JobRequest, JobState
from pipeq.core.store import Outcome
from pipeq.worker.model.media import media_length


@dataclass(eq=False)
class JobInFlight:
    """One job inside the worker: its request, collected outputs and completion signal."""

    request: JobRequest
    outputs: list[Any] = field(default_factory=list)
    remaining: int = 0
    outcome: Outcome | None = None
    started: bool = False
    #: When the job's first batch began (time.time()), for the run-time limit.
    started_at: float = 0.0
    #: Handed back unstarted at shutdown: its message is re-queued for another worker.
    returned: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    #: The inputs as the pipeline takes them: media envelopes decoded (pipeq.worker.model.media);
    #: by default the request's own inputs.
    items: list[Any] = field(default_factory=list)
    #: Claimed by the batcher thread that hands the job to ``finish_jobs`` (exactly one).
    finishing: bool = False

    def __post_init__(self) -> None:
        if not self.items:
            self.items = list(self.request.inputs)
        self.outputs = [None] * len(self.request.inputs)
        self.remaining = len(self.request.inputs)

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.request.job_id

    def fail(self, state: JobState, error_type: str, message: str, retryable: bool = False
             ) -> None:
        """Record a failure outcome (the first outcome wins)."""
        if self.outcome is None:
            self.outcome = Outcome(
                self.job_id, state,
                {"type": error_type, "message": message, "retryable": retryable},
                self.request.reply_to,
            )


@dataclass(slots=True)
class Slot:
    """One input of one job, waiting for a batch."""

    job: JobInFlight
    index: int
    item: Any
    length: int
    params_key: str


def input_length(item: Any) -> int:
    """A cheap proxy of an input's token count, for grouping inputs of similar length.

    Decoded media count samples (audio) or pixels (images), see ``media_length``.
    """
    media = media_length(item)
    if media is not None:
        return media
    if isinstance(item, str):
        return len(item)
    if isinstance(item, dict):
        return sum(len(v) for v in item.values() if isinstance(v, str))
    return 0
