"""Jobs inside the worker: a job in flight (its request, outputs, outcome, completion signal
and the delivery of its message) and the slots its inputs wait in for a batch."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pipeq.core.contract import JobRequest, JobState
from pipeq.core.store import Outcome
from pipeq.worker.model.media import media_length

if TYPE_CHECKING:
    from pipeq.worker.batching.textsinks import RedisTextSink


class Delivery(Protocol):
    """How a job's message is settled with whoever delivered it: Celery's consumer
    (``pipeq.worker.broker.strategy``) or a test harness (``pipeq.worker.testing``)."""

    #: kombu's delivery tag of the message (its entry in the unacked hash), if any.
    delivery_tag: str | None
    #: What Flower shows as the job's arguments (never the inputs themselves).
    summary: str

    def ack(self) -> None:
        """The job's record is stored: the message may go."""

    def requeue(self) -> None:
        """The job was not started here: put the message back for another worker."""


@dataclass(eq=False)
class JobInFlight:
    """One job inside the worker: its request, collected outputs and completion signal."""

    request: JobRequest
    #: The message's delivery (None in tests that feed the batcher directly).
    delivery: Delivery | None = None
    #: Where the finished job's id is pushed to wake its producer: the request's reply_to,
    #: checked to be one of this deployment's reply lists (None: nobody to wake).
    reply_key: str | None = None
    #: When the worker accepted the job's message (time.time()).
    received_at: float = field(default_factory=time.time)
    outputs: list[Any] = field(default_factory=list)
    remaining: int = 0
    outcome: Outcome | None = None
    started: bool = False
    #: When the job's first batch began (time.time()), for the run-time limit.
    started_at: float = 0.0
    #: Handed back unstarted at shutdown: its message is re-queued for another worker.
    returned: bool = False
    #: How the claim that took its message started it (state before, starts), when it did
    #: (``pipeq.worker.broker.claiming.ClaimStart``): its first batch then needs no start,
    #: and a stopping worker still runs it rather than hand it back (it reads STARTED).
    claim_start: tuple[JobState, int] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    #: The inputs as the pipeline takes them: media envelopes decoded (pipeq.worker.model.media);
    #: by default the request's own inputs.
    items: list[Any] = field(default_factory=list)
    #: Claimed by the batcher thread that hands the job to ``finish_jobs`` (exactly one).
    finishing: bool = False
    #: False when the job's end was recorded elsewhere already (a re-delivered finished job).
    announce: bool = True
    #: How many times the job has been started, this time included (1, 2 after a worker
    #: died...): the attempt its streamed text is tagged with. 0: not started here.
    attempt: int = 0
    #: Where its generated text goes, for a job that streams (set when it starts).
    text: RedisTextSink | None = None

    def __post_init__(self) -> None:
        if not self.items:
            self.items = list(self.request.inputs)
        self.outputs = [None] * len(self.request.inputs)
        self.remaining = len(self.request.inputs)

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.request.job_id

    def ended(self) -> Ended:
        """How the job leaves the worker (its outcome; None when handed back)."""
        outcome = None if self.returned else self.outcome
        return Ended(self.job_id, self.delivery, outcome, self.received_at, self.started_at,
                     self.announce)

    def fail(self, state: JobState, error_type: str, message: str, retryable: bool = False
             ) -> None:
        """Record a failure outcome (the first outcome wins)."""
        if self.outcome is None:
            self.outcome = Outcome(
                self.job_id, state,
                {"type": error_type, "message": message, "retryable": retryable},
                self.reply_key,
            )

    def succeed(self, result: Any) -> None:
        """Record the job's result (unless an outcome was recorded first)."""
        if self.outcome is None:
            self.outcome = Outcome(self.job_id, JobState.SUCCESS, result, self.reply_key)


@dataclass(frozen=True, slots=True)
class Ended:
    """A job as it leaves the worker: its message acknowledged, or handed back."""

    job_id: str
    delivery: Delivery | None
    #: The job's final outcome; None when it was handed back unstarted.
    outcome: Outcome | None
    received_at: float
    #: When it started running (0.0: never started here).
    started_at: float = 0.0
    #: False when its end was recorded before this delivery (a re-delivered finished job):
    #: nothing new to announce.
    announce: bool = True

    @property
    def requeued(self) -> bool:
        """True when the message went back to the queue for another worker."""
        return self.outcome is None


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


def hand_back_unstarted(jobs: list[JobInFlight], sink: JobSink) -> list[JobInFlight]:
    """A stopping worker's new jobs: hand back those not started yet (their messages go back
    to the queue); return the ones that run anyway, those their claim started (they read
    STARTED; see ``JobInFlight.claim_start``)."""
    back = [job for job in jobs if job.claim_start is None]
    for job in back:
        job.returned = True
    if back:
        sink.return_jobs(back)
    return [job for job in jobs if not job.returned]


#: A job to end early, its final state, error type and message.
Failure = tuple[JobInFlight, JobState, str, str]


class Batcher(Protocol):
    """What the route service drives: the static ``MicroBatcher`` (``batching.batcher``), or
    the continuous batcher of text-generation routes (``batching.continuous``)."""

    @property
    def alive(self) -> bool:
        """True while every thread of the batcher runs."""

    def start(self) -> None:
        """Start the batcher's threads."""

    def begin_shutdown(self) -> None:
        """Start no more jobs; unstarted ones are handed back (``JobSink.return_jobs``)."""

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the work in hand, then stop the threads."""

    def submit(self, job: JobInFlight) -> None:
        """Run every input of ``job``; ``job.done`` is set when it ends."""

    def end_early(self, failures: list[Failure]) -> None:
        """End jobs before all their inputs ran, with their failures."""


class JobSink(Protocol):
    """What the batcher tells about jobs (the route service implements it)."""

    def start_jobs(self, jobs: list[JobInFlight]) -> None:
        """Jobs enter their first batch: mark them STARTED, or give those that must not run
        (cancelled, expired, poison) their outcome."""

    def finish_jobs(self, jobs: list[JobInFlight]) -> None:
        """Jobs have their outcome: store the records, then settle the messages."""

    def return_jobs(self, jobs: list[JobInFlight]) -> None:
        """Jobs were not started because the worker stops: hand their messages back."""
