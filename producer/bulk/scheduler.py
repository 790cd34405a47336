"""Bulk work: any number of inputs, chunked, back-pressured, answered in input order.

A bulk job cuts its inputs into chunks (one job of ``chunk_size`` inputs each, sent on the
route's bulk lane, served after interactive jobs by the worker) and keeps at most
``max_in_flight`` chunks submitted and not yet handed to the caller. So a generator of
a million inputs never sits in the producer's memory nor in Redis at once, and a caller that
consumes slowly slows the submission down.

Failures stay per input: a chunk that fails is sent again when its error is retryable (an
expired deadline, a worker error), else (or when the retries are spent) split into one job per
input, so only the inputs that fail on their own are answered with an error.

Chunks held by a worker that dies are sent again as soon as its heartbeat stops (the old job
is cancelled, so a late redelivery of it is skipped by the worker), and a resumed bulk job
re-attaches to the chunk jobs its previous run left in flight (``attach``).

``RemotePipeline.map`` is the Python entry point; ``pipeq bulk`` (``pipeq.bulk.command``)
adds files, resume, progress and cancel on top of :class:`ChunkScheduler`.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, wait
from typing import TYPE_CHECKING, Any

import redis

from pipeq.bulk.cache import MISS, ResultCache
from pipeq.bulk.chunks import MISSING, BulkStats, Chunk, ItemError, Piece
from pipeq.core.contract import JobState, Lane
from pipeq.core.store import JobRecord
from pipeq.errors import ValidationError

if TYPE_CHECKING:
    from pipeq.remote import RemotePipeline

log = logging.getLogger("pipeq.bulk")

#: How many times a whole chunk is sent again after a retryable failure before it is split.
CHUNK_RETRIES = 2
#: How many times one input is sent again after a retryable failure before it is answered
#: with its error.
ITEM_RETRIES = 2
#: A chunk job not final this long after its deadline is taken as lost and sent again.
LOST_GRACE_S = 30.0

_INPUT_PREFIX = re.compile(r"^input #\d+: ")

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
        self.client.waiter.mark_published(request.job_id)

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
            waiter.mark_published(job_id)
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
            before = store.cancel(piece.job_id)  # None: its record is gone (lost): send again
            if before is not None and before.is_final:  # it ended meanwhile: take its record
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
            return self.client.registry.live_hostnames(self.remote.route)
        except redis.RedisError as exc:
            log.warning("cannot read live workers: %s", exc)
            return set(self._live or ())

    def _queued_job_ids(self) -> set[str]:
        """Ids of the jobs waiting in the lane's queue (short: bulk jobs bound it)."""
        return self.client.queued_job_ids(self.remote.route, self.lane)

    def _drop_records(self, chunk: Chunk) -> None:
        keys = [self.client.keys.result(p.job_id) for p in chunk.pieces]
        if keys:  # (they would expire with the result TTL anyway)
            self.client.delete(*keys)

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
        # fill-mask returns the only result of a one-element list unwrapped (model.runner)
        return [result]
    if isinstance(result, list) and len(result) == count:
        return result
    return None
