"""One run of ``pipeq bulk``: read the input file, drive the chunk scheduler, write the
output in order, keep the job's progress in Redis, and resume where a previous run stopped.

A bulk job has an id (derived from the input file, the route and the parameters unless
``--id`` is given). Its progress lives in the output file (complete lines, in input order)
and in the Redis hash ``Keys.bulk(id)``: totals, state, the cancel flag and the job ids of
the chunks in flight (``chunk:<n>``), which a resumed run re-attaches to.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import re
import resource
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import redis

from pipeq.bulk.chunks import MISSING, Chunk, ItemError
from pipeq.bulk.files import (
    BAD_INPUT,
    BadRecord,
    OutputWriter,
    Record,
    count_records,
    csv_has_header,
    guess_format,
    read_records,
    scan_output,
)
from pipeq.bulk.mapping import check_bulk_options, result_cache
from pipeq.bulk.progress import note, progress_bar
from pipeq.bulk.scheduler import ChunkScheduler
from pipeq.core.config import Settings
from pipeq.core.redis_io import as_text
from pipeq.errors import PipeqError, ValidationError
from pipeq.ops.exits import Exit
from pipeq.remote import pipeline

#: Bad lines reported one by one before the rest are only counted.
MAX_REPORTED_BAD_LINES = 20


@dataclass(frozen=True)
class BulkOptions:
    """What ``pipeq bulk`` was asked to do (its command-line options)."""

    task: str
    model: str
    input: Path
    output: Path
    revision: str | None = None
    format: str | None = None
    field: str | None = None
    column: str | None = None
    params: tuple[tuple[str, Any], ...] = ()
    chunk_size: int = 64
    max_in_flight: int = 8
    timeout: float | None = None
    resume: bool = False
    on_error: str = "record"
    strict: bool = False
    cache: bool = False
    bulk_id: str | None = None
    no_require_worker: bool = False
    quiet: bool = False
    json: bool = False


class StrictInputError(ValidationError):
    """Raised when ``--strict`` meets an input line that cannot be read."""




def derive_id(input_path: Path, route_id: str, params: dict[str, Any], fmt: str,
              field: str | None, column: str | None) -> str:
    """A bulk job's default id: the same command on the same file gives the same id."""
    identity = json.dumps([str(input_path.resolve()), route_id, params, fmt, field, column],
                          sort_keys=True, default=str)
    digest = hashlib.sha1(identity.encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", input_path.stem)[:32] or "bulk"
    return f"{stem}-{digest}"


def read_state(client: redis.Redis, key: str) -> dict[str, str]:
    """A bulk job's progress hash as text (empty when Redis knows no such job)."""
    return {as_text(k): as_text(v) for k, v in client.hgetall(key).items()}



# --- running a bulk job ------------------------------------------------------------------------


class BulkRun:
    """One run of a bulk job: the output file, its Redis hash, the progress and the summary."""

    def __init__(self, args: BulkOptions, settings: Settings):
        self.args = args
        self.remote = pipeline(args.task, model=args.model, revision=args.revision,
                               settings=settings)
        self.client = self.remote.client
        self.redis = self.client.redis
        self.params = check_bulk_options(self.remote, args.chunk_size, args.max_in_flight,
                                         dict(args.params))
        if not args.input.is_file():
            raise ValidationError(f"input file {args.input} does not exist")
        self.fmt = args.format or guess_format(args.input)
        if args.column is not None and self.fmt != "csv":
            raise ValidationError("--column is for CSV input (--format csv)")
        self.bulk_id = args.bulk_id or derive_id(args.input, self.remote.route.id, self.params,
                                                 self.fmt, args.field, args.column)
        self.key = self.client.keys.bulk(self.bulk_id)
        self.ttl = settings.result_ttl_s
        self.chunk_size = args.chunk_size
        self.reported_bad = 0
        self.started = time.monotonic()

    def run(self) -> int:
        """Run (or resume) the bulk job; returns the exit code."""
        with open(self.args.output, "a+b") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValidationError(
                    f"another `pipeq bulk` is writing {self.args.output} right now") from None
            return self._run_locked(handle)

    def _run_locked(self, handle: IO[bytes]) -> int:
        state = read_state(self.redis, self.key)
        if state.get("chunk_size") and int(state["chunk_size"]) != self.chunk_size:
            print(f"pipeq bulk: {self.bulk_id} was started with --chunk-size "
                  f"{state['chunk_size']}; continuing with it", file=sys.stderr)
            self.chunk_size = int(state["chunk_size"])
        total = count_records(self.args.input, self.fmt) - csv_has_header(self.args.column)
        done = scan_output(handle, self.chunk_size, total)
        handle.seek(0, os.SEEK_END)
        self._check_resumable(state, handle.tell() > 0)
        handle.truncate(done.size)
        attach = self._attachments(state)
        first_chunk = done.answered // self.chunk_size
        stale = [f"chunk:{n}" for n in attach if n < first_chunk]  # written, not yet forgotten
        if stale:
            self.redis.hdel(self.key, *stale)
        self._save(state="running", total=total, done=done.answered, failed=done.failed,
                   chunk_size=self.chunk_size, input=str(self.args.input.resolve()),
                   output=str(self.args.output.resolve()), route=self.remote.route.describe(),
                   params=json.dumps(self.params), pid=os.getpid(), host=socket.gethostname(),
                   cancel=0, session_started=time.time(), session_done=done.answered,
                   started_at=state.get("started_at", time.time()))
        if not self.args.no_require_worker and done.answered < total:
            self.remote.check_workers(True)
        self.answered, self.failed, self.total = done.answered, done.failed, total
        resuming = f", resuming at input #{done.answered}" if done.answered else ""
        note(f"pipeq bulk: job {self.bulk_id}, {total} inputs{resuming} "
              f"(`pipeq bulk status {self.bulk_id}` from another shell)")
        self.bad_lines = done.bad
        scheduler = ChunkScheduler(
            self.remote, self.params, max_in_flight=self.args.max_in_flight,
            timeout=self.args.timeout, should_stop=self._cancel_requested,
            on_pieces=self._persist_pieces, attach=attach, cancel_on_close=False,
            cache=result_cache(self.remote, self.params) if self.args.cache else None,
            progress=lambda: (f"bulk {self.bulk_id}: {self.answered}/{self.total} answered, "
                              f"{self.failed} failed"))
        records = read_records(self.args.input, self.fmt, field=self.args.field,
                               column=self.args.column)
        chunks = self._chunks(records, done.answered)
        return self._drive(scheduler, chunks, OutputWriter(handle, done.answered))

    def _check_resumable(self, state: dict[str, str], has_output: bool) -> None:
        if self.args.resume:
            return
        if has_output and not state:
            raise ValidationError(
                f"{self.args.output} already holds answers and Redis has no record of bulk job "
                f"{self.bulk_id}: pass --resume to continue it, or remove the file")
        if state.get("state") == "cancelled":
            raise ValidationError(f"bulk job {self.bulk_id} was cancelled: pass --resume to "
                                  "continue it anyway")

    def _attachments(self, state: dict[str, str]) -> dict[int, list[tuple[str, list[int]]]]:
        """The chunk jobs a previous run left in flight, by chunk number."""
        attach: dict[int, list[tuple[str, list[int]]]] = {}
        if int(state.get("chunk_size", self.chunk_size)) != self.chunk_size:
            self.redis.hdel(self.key, *[n for n in state if n.startswith("chunk:")] or ["-"])
            return attach
        for name, value in state.items():
            if name.startswith("chunk:"):
                pieces = json.loads(value)
                attach[int(name.split(":", 1)[1])] = [(str(j), list(o)) for j, o in pieces]
        return attach

    def _drive(self, scheduler: ChunkScheduler, chunks: Iterator[Chunk],
               writer: OutputWriter) -> int:
        progress = progress_bar(self.total, self.answered, self.args.quiet)
        try:
            for chunk in scheduler.run(chunks):
                if self.args.on_error == "fail" and chunk.failures:
                    return self._stop_on_failure(chunk)
                self._write(chunk, writer)
                progress(len(chunk.items), self.failed)
        except PipeqError:
            self._save(state="failed")
            raise
        except KeyboardInterrupt:
            self._save(state="interrupted")
            print(f"\npipeq bulk: interrupted with {self.answered} of {self.total} inputs "
                  f"answered in {self.args.output}; run the same command again to continue",
                  file=sys.stderr)
            return Exit.INTERRUPTED
        finally:
            progress(0, self.failed, close=True)
        if scheduler.stopped:
            self._save(state="cancelled")
            print(f"pipeq bulk: {self.bulk_id} cancelled with {self.answered} of {self.total} "
                  "inputs answered; `--resume` continues it", file=sys.stderr)
            self._summary(scheduler)
            return Exit.FAILED
        self._save(state="finished")
        self._summary(scheduler)
        return Exit.OK

    def _write(self, chunk: Chunk, writer: OutputWriter) -> None:
        answers = [("error", a.as_dict()) if isinstance(a, ItemError) else ("result", a)
                   for a in chunk.answers]
        writer.write_chunk(chunk.start, answers)
        failures = chunk.failures
        self.answered += len(answers)
        self.failed += failures
        self.bad_lines += sum(isinstance(a, ItemError) and a.type == BAD_INPUT
                              for a in chunk.answers)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hincrby(self.key, "done", len(answers))
        pipe.hincrby(self.key, "failed", failures)
        pipe.hdel(self.key, f"chunk:{chunk.number}")
        pipe.hset(self.key, "updated_at", time.time())
        pipe.expire(self.key, self.ttl)
        pipe.execute()

    def _stop_on_failure(self, chunk: Chunk) -> int:
        offset, error = next(
            (o, a) for o, a in enumerate(chunk.answers) if isinstance(a, ItemError))
        self._save(state="failed")
        print(f"pipeq bulk: input #{chunk.start + offset} failed: {error.type}: {error.message}; "
              f"stopped (--on-error fail) with {self.answered} inputs answered in "
              f"{self.args.output}", file=sys.stderr)
        return Exit.FAILED

    def _chunks(self, records: Iterator[Record], start: int) -> Iterator[Chunk]:
        remaining = itertools.islice(records, start, None)
        number = start // self.chunk_size
        while batch := list(itertools.islice(remaining, self.chunk_size)):
            items: list[Any] = []
            answers: list[Any] = []
            for record in batch:
                if isinstance(record.value, BadRecord):
                    self._bad_line(record.value)
                    items.append(None)
                    answers.append(ItemError(BAD_INPUT, record.value.message))
                else:
                    items.append(record.value)
                    answers.append(MISSING)
            yield Chunk(number, number * self.chunk_size, items, answers)
            number += 1

    def _bad_line(self, bad: BadRecord) -> None:
        if self.args.strict:
            raise StrictInputError(f"{bad.message} (--strict)")
        self.reported_bad += 1
        if self.reported_bad <= MAX_REPORTED_BAD_LINES:
            note(f"pipeq bulk: {self.args.input}: {bad.message}")
        elif self.reported_bad == MAX_REPORTED_BAD_LINES + 1:
            note("pipeq bulk: more unreadable lines follow; counted in the summary")

    def _persist_pieces(self, chunk: Chunk) -> None:
        pieces = [[p.job_id, p.offsets] for p in chunk.pieces]
        self.redis.hset(self.key, f"chunk:{chunk.number}", json.dumps(pieces))

    def _cancel_requested(self) -> bool:
        return as_text(self.redis.hget(self.key, "cancel") or "0") == "1"

    def _save(self, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        self.redis.hset(self.key, mapping={k: str(v) for k, v in fields.items()})
        self.redis.expire(self.key, self.ttl)

    def _summary(self, scheduler: ChunkScheduler) -> None:
        seconds = time.monotonic() - self.started
        session = self.answered - int(read_state(self.redis, self.key).get("session_done", 0))
        summary = {
            "bulk_id": self.bulk_id, "output": str(self.args.output), "total": self.total,
            "answered": self.answered, "failed": self.failed, "bad_lines": self.bad_lines,
            "answered_this_run": session, "seconds": round(seconds, 3),
            "inputs_per_s": round(session / seconds, 1) if seconds > 0 else None,
            "chunks_resent": scheduler.stats.resent, "chunks_split": scheduler.stats.split,
            "jobs_reattached": scheduler.stats.reattached,
            "cache_hits": scheduler.stats.cache_hits,
            "peak_rss_mb": peak_rss_mb(),
        }
        if self.args.json:
            print(json.dumps(summary))
            return
        print(f"bulk {self.bulk_id}: {self.answered} of {self.total} inputs answered "
              f"({self.failed} failed, {self.bad_lines} unreadable lines) in {seconds:.1f}s, "
              f"{summary['inputs_per_s']} inputs/s; output {self.args.output}; "
              f"peak RSS {summary['peak_rss_mb']} MB"
              + (f"; {scheduler.stats.cache_hits} answered from the cache"
                 if self.args.cache else ""))


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB.

    Linux's VmHWM belongs to the process image: getrusage's ru_maxrss survives execve, so a
    command started by a big parent (fork, then exec) would report the parent's size.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
