"""Bulk work: any number of inputs, chunked, back-pressured, answered in input order.

A bulk job cuts its inputs into chunks (one job of ``chunk_size`` inputs each, sent on the
route's bulk lane: ``Keys.bulk_queue``, served after interactive jobs by the worker) and keeps
at most ``max_in_flight`` chunks submitted and not yet handed to the caller. So a generator of
a million inputs never sits in the producer's memory nor in Redis at once, and a caller that
consumes slowly slows the submission down.

Failures stay per input: a chunk that fails is sent again when its error is retryable (an
expired deadline, a worker error), else (or when the retries are spent) split into one job per
input, so only the inputs that fail on their own are answered with an error.

Chunks held by a worker that dies are sent again as soon as its heartbeat stops (the old job
is cancelled, so a late redelivery of it is skipped by the worker), and a resumed bulk job
re-attaches to the chunk jobs its previous run left in flight (``attach``).

``RemotePipeline.map`` is the Python entry point; ``pipeq bulk`` (``producer.bulk_cli``)
adds files, resume, progress and cancel on top of :class:`ChunkScheduler`.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from .cache import MISS, ResultCache
from .contract import JobState, Lane
from .errors import JobFailed, ValidationError
from .params import validate_params
from .store import JobRecord

if TYPE_CHECKING:
    from .client import RemotePipeline

log = logging.getLogger("pipeq.bulk")

#: How many times a whole chunk is sent again after a retryable failure before it is split.
CHUNK_RETRIES = 2
#: How many times one input is sent again after a retryable failure before it is answered
#: with its error.
ITEM_RETRIES = 2
#: A chunk job not final this long after its deadline is taken as lost and sent again.
LOST_GRACE_S = 30.0

_INPUT_PREFIX = re.compile(r"^input #\d+: ")


@dataclass(frozen=True, slots=True)
class ItemError:
    """The error that answers one input of a bulk job (bad input, or the job failed on it)."""

    type: str
    message: str
    retryable: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, as ``pipeq bulk`` writes it."""
        return {"type": self.type, "message": self.message, "retryable": self.retryable}


class _Missing:
    """Marks an input not answered yet."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


@dataclass(eq=False)
class Piece:
    """One job of a chunk: some of its inputs (by offset), and the future of the job's record."""

    offsets: list[int]
    job_id: str
    future: Future[JobRecord]
    attempts: int = 1
    deadline: float | None = None
    #: True once its record has been taken into the chunk's answers (or acted upon).
    settled: bool = False


@dataclass(eq=False)
class Chunk:
    """``items`` of a bulk job from input ``start`` on; ``answers`` fill in as jobs end."""

    number: int
    start: int
    items: list[Any]
    answers: list[Any] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    #: Set when the chunk will not be completed (the bulk job was cancelled).
    aborted: bool = False
    #: Offsets answered from the result cache (not to be stored in it again).
    cached: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.answers:
            self.answers = [MISSING] * len(self.items)

    @property
    def complete(self) -> bool:
        """True when every input has its answer."""
        return not any(a is MISSING for a in self.answers)

    @property
    def failures(self) -> int:
        """How many inputs are answered with an error."""
        return sum(isinstance(a, ItemError) for a in self.answers)

    def outstanding(self) -> list[Piece]:
        """Pieces whose jobs have not ended yet."""
        return [p for p in self.pieces if not p.future.done()]

    def ended(self) -> list[Piece]:
        """Pieces whose jobs have ended but whose records are not taken in yet."""
        return [p for p in self.pieces if not p.settled and p.future.done()]


@dataclass
class BulkStats:
    """Counters of one scheduler run (for summaries and benchmarks)."""

    chunks_sent: int = 0
    resent: int = 0
    split: int = 0
    reattached: int = 0
    cache_hits: int = 0


PiecesChanged = Callable[[Chunk], None]


class ChunkScheduler:
    """Sends chunks as bulk-lane jobs, at most ``max_in_flight`` at a time; yields them in order.

    ``should_stop`` is asked about every ``check_s`` seconds (``pipeq bulk cancel`` sets the
    flag it reads); ``on_pieces`` is told whenever a chunk's set of jobs changes (to persist
    the job ids for a later resume); ``attach`` maps chunk numbers to the ``(job id, offsets)``
    pairs a previous run left, to re-attach to instead of sending the inputs again.
    ``lane="interactive"`` sends the chunks as ordinary jobs (the benchmark's control run).
    ``progress`` says how far the whole job is; each chunk job carries it into Flower (as its
    arguments), so Flower's task list, searched for the bulk id, follows the job.
    ``cache``: answer inputs from it where it can, and keep the computed answers in it.
    """

    def __init__(self, remote: RemotePipeline, params: dict[str, Any], *, max_in_flight: int = 8,
                 timeout: float | None = None, should_stop: Callable[[], bool] | None = None,
                 on_pieces: PiecesChanged | None = None,
                 attach: dict[int, list[tuple[str, list[int]]]] | None = None,
                 cancel_on_close: bool = True, check_s: float = 1.0, lane: Lane = "bulk",
                 progress: Callable[[], str] | None = None, cache: ResultCache | None = None):
        if max_in_flight < 1:
            raise ValidationError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.remote = remote
        self.client = remote.client
        self.params = params
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.should_stop = should_stop or (lambda: False)
        self.on_pieces = on_pieces
        self.attach = attach or {}
        self.cancel_on_close = cancel_on_close
        self.check_s = check_s
        self.lane: Lane = lane
        self.progress = progress or (lambda: "map()")
        self.cache = cache
        self.stats = BulkStats()
        self.stopped = False
        self._window: deque[Chunk] = deque()
        self._live: set[str] | None = None
        self._next_check = 0.0

    # --- the loop -------------------------------------------------------------------------

    def run(self, chunks: Iterable[Chunk]) -> Iterator[Chunk]:
        """Yield every chunk of ``chunks``, answered, in order (fewer if stopped)."""
        source = iter(chunks)
        exhausted = False
        closed_early = True
        try:
            while True:
                while not exhausted and not self.stopped and len(self._window) < self.max_in_flight:
                    chunk = next(source, None)
                    if chunk is None:
                        exhausted = True
                        break
                    self._admit(chunk)
                    self._window.append(chunk)
                if self._window and self._window[0].complete:
                    chunk = self._window.popleft()
                    self._keep_answers(chunk)
                    yield chunk
                    # Handed over (for `pipeq bulk`: written and fsynced): its job records
                    # need not wait out the result TTL, so Redis holds only chunks in flight.
                    self._drop_records(chunk)
                    continue
                if not self._window or self.stopped:
                    closed_early = bool(self._window)
                    return
                self._wait()
        finally:
            if closed_early and self.cancel_on_close:
                self._cancel_outstanding()

    def _wait(self) -> None:
        ended = [(c, p) for c in self._window for p in c.ended()]
        if not ended:
            futures = [p.future for c in self._window for p in c.outstanding()]
            if futures:
                wait(futures, timeout=self.check_s, return_when=FIRST_COMPLETED)
            else:  # nothing in flight, yet an input unanswered: never wait for nothing
                for chunk in self._window:
                    self._send_uncovered(chunk)
            ended = [(c, p) for c in self._window for p in c.ended()]
        for chunk, piece in ended:
            if not self.stopped:
                self._settle(chunk, piece, piece.future.result())
        if time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + self.check_s
            self._periodic_checks()

    def _periodic_checks(self) -> None:
        if self.should_stop():
            log.info("bulk job stopping: cancel requested")
            self.stopped = True
            for chunk in self._window:
                chunk.aborted = not chunk.complete
            return
        live = self._live_workers()
        lost = (self._live or set()) - live
        self._live = live
        now = time.time()
        overdue = [(c, p) for c in self._window for p in c.outstanding()
                   if p.deadline is not None and now > p.deadline + LOST_GRACE_S]
        if lost:
            log.warning("worker(s) %s stopped; sending their chunks again", ", ".join(sorted(lost)))
            self._recover([(c, p) for c in self._window for p in c.outstanding()])
        elif overdue:
            self._recover(overdue)

    # --- sending ----------------------------------------------------------------------------

    def _admit(self, chunk: Chunk) -> None:
        known = self.attach.pop(chunk.number, None)
        if known:
            self._reattach(chunk, known)
        elif self.cache is not None:
            self._answer_from_cache(chunk)
        self._send_uncovered(chunk)
        self.stats.chunks_sent += 1
        self._changed(chunk)

    def _answer_from_cache(self, chunk: Chunk) -> None:
        assert self.cache is not None
        for offset, answer in enumerate(self.cache.get_many(chunk.items)):
            if answer is not MISS:
                chunk.answers[offset] = answer
                chunk.cached.add(offset)
        self.stats.cache_hits += len(chunk.cached)

    def _keep_answers(self, chunk: Chunk) -> None:
        if self.cache is None or chunk.aborted:
            return
        fresh = [o for o, a in enumerate(chunk.answers)
                 if o not in chunk.cached and a is not MISSING and not isinstance(a, ItemError)]
        if fresh:
            self.cache.put_many([chunk.items[o] for o in fresh], [chunk.answers[o] for o in fresh])

    def _send_uncovered(self, chunk: Chunk) -> None:
        """Send the unanswered inputs no job of the chunk is running for."""
        covered = {o for p in chunk.pieces if not p.settled for o in p.offsets}
        missing = [o for o, a in enumerate(chunk.answers) if a is MISSING and o not in covered]
        if missing:
            self._send(chunk, missing, attempts=1)
            self._changed(chunk)

    def _send(self, chunk: Chunk, offsets: list[int], attempts: int) -> None:
        items = [chunk.items[o] for o in offsets]
        try:
            request = self.remote.build_request(items, self.params, self.timeout, lane=self.lane)
        except ValidationError as exc:
            if len(offsets) == 1:
                chunk.answers[offsets[0]] = ItemError("ValidationError", str(exc))
                return
            good = [o for o in offsets if self._valid(chunk, o)]
            if good:
                self._send(chunk, good, attempts)
            return
        future = self.client.waiter.watch(request.job_id)
        chunk.pieces.append(Piece(offsets, request.job_id, future, attempts, request.deadline))
        first = chunk.start + offsets[0]
        self.client.send(request, summary=(
            f"{self.progress()} | chunk {chunk.number}: {len(offsets)} input(s) from #{first}"))

    def _valid(self, chunk: Chunk, offset: int) -> bool:
        try:
            self.remote.build_request([chunk.items[offset]], self.params, self.timeout)
        except ValidationError as exc:
            chunk.answers[offset] = ItemError("ValidationError", str(exc))
            return False
        return True

    def _changed(self, chunk: Chunk) -> None:
        if self.on_pieces is not None:
            self.on_pieces(chunk)

    # --- results ----------------------------------------------------------------------------

    def _settle(self, chunk: Chunk, piece: Piece, record: JobRecord) -> None:
        piece.settled = True
        if record.state == JobState.SUCCESS:
            results = _per_input(self.remote.task, record.result, len(piece.offsets))
            if results is not None:
                for offset, result in zip(piece.offsets, results, strict=True):
                    chunk.answers[offset] = result
                return
            error = {"type": "BatchSizeMismatch", "retryable": True,
                     "message": f"chunk job returned no list of {len(piece.offsets)} results"}
        elif record.state == JobState.CANCELLED and self.should_stop():
            self.stopped = True
            chunk.aborted = True
            return
        else:
            error = record.error or {"type": record.state.value, "message": "no error stored"}
        self._failed(chunk, piece, record.state, error)

    def _failed(self, chunk: Chunk, piece: Piece, state: JobState, error: dict[str, Any]) -> None:
        retryable = bool(error.get("retryable")) or state == JobState.EXPIRED
        multi = len(piece.offsets) > 1
        chunk.pieces.remove(piece)
        if retryable and piece.attempts <= (CHUNK_RETRIES if multi else ITEM_RETRIES):
            log.info("chunk %d job %s: %s; sending it again", chunk.number, piece.job_id,
                     error.get("type"))
            self.stats.resent += 1
            self._send(chunk, piece.offsets, piece.attempts + 1)
        elif multi:
            log.info("chunk %d job %s failed (%s); sending its %d inputs one by one",
                     chunk.number, piece.job_id, error.get("type"), len(piece.offsets))
            self.stats.split += 1
            for offset in piece.offsets:
                self._send(chunk, [offset], 1)
        else:
            message = _INPUT_PREFIX.sub("", str(error.get("message", "")))
            chunk.answers[piece.offsets[0]] = ItemError(
                str(error.get("type", "Error")), message, bool(error.get("retryable")))
            chunk.pieces.append(piece)  # kept: a resumed run reads its record again
        self._changed(chunk)

    # --- jobs lost with a worker, and re-attaching --------------------------------------------

    def _reattach(self, chunk: Chunk, known: list[tuple[str, list[int]]]) -> None:
        waiter = self.client.waiter
        pairs = []
        for job_id, offsets in known:
            if not offsets or any(chunk.answers[o] is not MISSING for o in offsets):
                continue
            piece = Piece(list(offsets), job_id, waiter.watch(job_id))
            chunk.pieces.append(piece)
            pairs.append((chunk, piece))
        self.stats.reattached += len(pairs)
        self._recover(pairs)

    def _recover(self, pairs: list[tuple[Chunk, Piece]]) -> None:
        """Send again the pieces whose jobs are gone: held by a dead worker, lost, or unknown."""
        if not pairs:
            return
        store = self.client.store
        records = store.get_many([p.job_id for _, p in pairs])
        live = self._live_workers()
        queued = self._queued_job_ids()
        now = time.time()
        for (chunk, piece), record in zip(pairs, records, strict=True):
            if record is not None and record.state.is_final:
                self.client.waiter.resolve(record)
                continue
            overdue = piece.deadline is not None and now > piece.deadline + LOST_GRACE_S
            if record is not None and record.state == JobState.STARTED:
                if record.worker in live and not overdue:
                    continue  # a live worker runs it
            elif piece.job_id in queued and not overdue:
                continue  # still waiting in the bulk queue
            before = store.cancel(piece.job_id)
            if before.is_final:  # it ended meanwhile: take its record
                final = store.get(piece.job_id)
                if final is not None:
                    self.client.waiter.resolve(final)
                continue
            self.client.waiter.forget(piece.job_id)
            chunk.pieces.remove(piece)
            self.stats.resent += 1
            self._send(chunk, piece.offsets, piece.attempts)
            self._changed(chunk)

    def _live_workers(self) -> set[str]:
        try:
            registry = self.client.registry
            names = registry.client.zrangebyscore(
                self.client.keys.route_workers(self.remote.route), time.time(), "+inf")
        except redis.RedisError as exc:
            log.warning("cannot read live workers: %s", exc)
            return set(self._live or ())
        return {n.decode() if isinstance(n, bytes) else str(n) for n in names}

    def _queued_job_ids(self, limit: int = 100_000) -> set[str]:
        """Ids of the jobs waiting in the lane's queue (short: bulk jobs bound it)."""
        keys = self.client.keys
        queue = keys.broker_prefix + keys.queue_for(self.remote.route, self.lane)
        raw = self.client.redis.lrange(queue, 0, limit - 1)
        ids = set()
        for message in raw:
            try:
                ids.add(str(json.loads(message)["headers"]["id"]))
            except (ValueError, KeyError, TypeError):
                continue
        return ids

    def _drop_records(self, chunk: Chunk) -> None:
        keys = [self.client.keys.result(p.job_id) for p in chunk.pieces]
        if keys:
            try:
                self.client.redis.delete(*keys)
            except redis.RedisError as exc:  # they expire with the result TTL anyway
                log.warning("could not delete the job records of chunk %d: %s", chunk.number, exc)

    def _cancel_outstanding(self) -> None:
        ids = [p.job_id for c in self._window for p in c.outstanding()]
        for job_id in ids:
            try:
                self.client.store.cancel(job_id)
            except redis.RedisError as exc:
                log.warning("could not cancel bulk chunk job %s: %s", job_id, exc)
            self.client.waiter.forget(job_id)


def _per_input(task: str, result: Any, count: int) -> list[Any] | None:
    """Per-input results of a list job of ``count`` inputs (None if the shape is wrong)."""
    if task == "fill-mask" and count == 1:
        # fill-mask returns a one-element list's only result unwrapped (see worker.runner)
        return [result]
    if isinstance(result, list) and len(result) == count:
        return result
    return None


def chunked(inputs: Iterable[Any], chunk_size: int, first_number: int = 0) -> Iterator[Chunk]:
    """Chunks of ``chunk_size`` inputs, read lazily from ``inputs``."""
    iterator = iter(inputs)
    for number in itertools.count(first_number):
        items = list(itertools.islice(iterator, chunk_size))
        if not items:
            return
        yield Chunk(number, number * chunk_size, items)


def result_cache(remote: RemotePipeline, params: dict[str, Any]) -> ResultCache:
    """The result cache of ``remote``'s route with ``params``."""
    client = remote.client
    return ResultCache(client.redis, client.keys, remote.route, params,
                       client.settings.result_ttl_s)


def check_bulk_options(remote: RemotePipeline, chunk_size: int, max_in_flight: int,
                       params: dict[str, Any]) -> dict[str, Any]:
    """Validate a bulk job's options and call parameters; returns the clean parameters."""
    limit = remote.client.settings.max_inputs_per_job
    if not 1 <= chunk_size <= limit:
        raise ValidationError(
            f"chunk_size must be between 1 and {limit} (PIPEQ_MAX_INPUTS_PER_JOB), got {chunk_size}"
        )
    if max_in_flight < 1:
        raise ValidationError(f"max_in_flight must be >= 1, got {max_in_flight}")
    return validate_params(remote.task, params)


def map_inputs(remote: RemotePipeline, inputs: Iterable[Any], *, chunk_size: int = 64,
               max_in_flight: int = 8, on_error: str = "raise", timeout: float | None = None,
               cache: bool = False, **params: Any) -> Iterator[Any]:
    """Results of ``remote`` for every input of ``inputs``, in input order, as they arrive.

    Options and parameters are checked at once (ValidationError), and so is a live worker
    (NoWorkerError); the inputs are read only as the results are consumed. Each result is
    what the local pipeline's list call returns for that input. ``on_error="raise"`` raises
    the first failed input's JobFailed when its turn comes; ``"record"`` yields an
    :class:`ItemError` in its place. Closing the generator early cancels the chunks in flight.
    ``cache=True``: inputs answered within the result TTL for the same route and parameters
    are not run again (producer.cache).
    """
    if on_error not in ("raise", "record"):
        raise ValidationError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    clean = check_bulk_options(remote, chunk_size, max_in_flight, params)
    remote._check_workers(None)
    scheduler = ChunkScheduler(remote, clean, max_in_flight=max_in_flight, timeout=timeout,
                               cache=result_cache(remote, clean) if cache else None)
    return _answers(scheduler, chunked(inputs, chunk_size), on_error)


def _answers(scheduler: ChunkScheduler, chunks: Iterator[Chunk], on_error: str) -> Iterator[Any]:
    for chunk in scheduler.run(chunks):
        for offset, answer in enumerate(chunk.answers):
            if isinstance(answer, ItemError) and on_error == "raise":
                job_ids = [p.job_id for p in chunk.pieces if offset in p.offsets]
                raise JobFailed(job_ids[0] if job_ids else "-", answer.type,
                                f"input #{chunk.start + offset}: {answer.message}",
                                answer.retryable)
            yield answer
