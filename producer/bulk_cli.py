"""``pipeq bulk``: every input of a file through a route, in order, resumable, with progress.

    pipeq bulk --task T --model M --input docs.jsonl --output out.jsonl [--field text]
    pipeq bulk ... --resume          # after Ctrl-C, a crash or a reboot: continues
    pipeq bulk status BULK_ID        # from another shell
    pipeq bulk cancel BULK_ID        # stop scheduling; cancel the chunk jobs still queued

A bulk job has an id (derived from the input file, the route and the parameters unless
``--id`` is given). Its progress lives in the output file (complete lines, in input order)
and in the Redis hash ``Keys.bulk(id)``: totals, state, the cancel flag and the job ids of
the chunks in flight (``chunk:<n>``), which a resumed run re-attaches to. Running the same
command again resumes it; ``--resume`` also continues an output file Redis knows nothing
about (and a cancelled job).

Exit codes: those of ``pipeq``, plus 1 when the job was cancelled or stopped on a failed input
(``--on-error fail``), and 130 when interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import redis

from .bulk import MISSING, Chunk, ChunkScheduler, ItemError, check_bulk_options, result_cache
from .bulk_io import (
    BAD_INPUT,
    FORMATS,
    BadRecord,
    OutputWriter,
    Record,
    count_records,
    csv_has_header,
    guess_format,
    read_records,
    scan_output,
)
from .cli import (
    EXIT_BROKER,
    EXIT_FAILED,
    EXIT_NO_WORKER,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    _parse_param,
)
from .config import Settings, load_settings
from .errors import (
    BrokerUnavailable,
    ConfigError,
    JobTimeout,
    NoWorkerError,
    PipeqError,
    ValidationError,
)

EXIT_INTERRUPTED = 130
#: Bad lines reported one by one before the rest are only counted.
MAX_REPORTED_BAD_LINES = 20

_EXIT_CODES: list[tuple[type[Exception], int]] = [
    (ValidationError, EXIT_USAGE), (ConfigError, EXIT_USAGE), (NoWorkerError, EXIT_NO_WORKER),
    (JobTimeout, EXIT_TIMEOUT), (BrokerUnavailable, EXIT_BROKER), (PipeqError, EXIT_FAILED),
]


class StrictInputError(ValidationError):
    """Raised when ``--strict`` meets an input line that cannot be read."""


def build_parser() -> argparse.ArgumentParser:
    """The ``pipeq bulk`` argument parser (``status`` and ``cancel`` have their own)."""
    parser = argparse.ArgumentParser(
        prog="pipeq bulk", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--revision")
    parser.add_argument("--input", required=True, type=Path, help="input file")
    parser.add_argument("--output", required=True, type=Path, help="output JSONL file")
    parser.add_argument("--format", choices=FORMATS,
                        help="input format (default: from the file name; text otherwise)")
    parser.add_argument("--field", help="JSONL: the field holding the input (default: text)")
    parser.add_argument("--column", help="CSV: column number (0-based) or header name")
    parser.add_argument("--param", action="append", type=_parse_param, default=[],
                        metavar="KEY=VALUE", help="call parameter (VALUE parsed as JSON if it can)")
    parser.add_argument("--chunk-size", type=int, default=64, help="inputs per job (64)")
    parser.add_argument("--max-in-flight", type=int, default=8,
                        help="chunks sent and not yet written (8)")
    parser.add_argument("--timeout", type=float, help="deadline of each chunk job, in seconds")
    parser.add_argument("--resume", action="store_true",
                        help="continue an existing output file (even one Redis does not know)")
    parser.add_argument("--on-error", choices=("record", "fail"), default="record",
                        help="a failed input: record its error in the output, or stop")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable line")
    parser.add_argument("--cache", action="store_true",
                        help="answer inputs already answered within PIPEQ_RESULT_TTL_S (same "
                        "route and parameters) from Redis instead of running them again")
    parser.add_argument("--id", dest="bulk_id", help="bulk job id (default: derived)")
    parser.add_argument("--no-require-worker", action="store_true",
                        help="start even if no live worker serves the route yet")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of ``pipeq bulk``."""
    try:
        if argv and argv[0] in ("status", "cancel"):
            sub = argparse.ArgumentParser(prog=f"pipeq bulk {argv[0]}")
            sub.add_argument("bulk_id")
            sub.add_argument("--json", action="store_true")
            args = sub.parse_args(argv[1:])
            settings = load_settings()
            return (bulk_status if argv[0] == "status" else bulk_cancel)(settings, args)
        return run_bulk(build_parser().parse_args(argv))
    except redis.RedisError as exc:
        print(f"pipeq bulk: Redis failed: {exc}", file=sys.stderr)
        return EXIT_BROKER
    except PipeqError as exc:
        print(f"pipeq bulk: {exc}", file=sys.stderr)
        return next(code for kind, code in _EXIT_CODES if isinstance(exc, kind))


def derive_id(input_path: Path, route_id: str, params: dict[str, Any], fmt: str,
              field: str | None, column: str | None) -> str:
    """A bulk job's default id: the same command on the same file gives the same id."""
    identity = json.dumps([str(input_path.resolve()), route_id, params, fmt, field, column],
                          sort_keys=True, default=str)
    digest = hashlib.sha1(identity.encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", input_path.stem)[:32] or "bulk"
    return f"{stem}-{digest}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read_state(client: redis.Redis, key: str) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in client.hgetall(key).items()}


# --- running a bulk job ------------------------------------------------------------------------


class BulkRun:
    """One run of a bulk job: the output file, its Redis hash, the progress and the summary."""

    def __init__(self, args: argparse.Namespace, settings: Settings):
        from .client import pipeline

        self.args = args
        self.remote = pipeline(args.task, model=args.model, revision=args.revision,
                               settings=settings)
        self.client = self.remote.client
        self.redis = self.client.redis
        self.params = check_bulk_options(self.remote, args.chunk_size, args.max_in_flight,
                                         dict(args.param))
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
        state = _read_state(self.redis, self.key)
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
            self.remote._check_workers(True)
        self.answered, self.failed, self.total = done.answered, done.failed, total
        resuming = f", resuming at input #{done.answered}" if done.answered else ""
        _note(f"pipeq bulk: job {self.bulk_id}, {total} inputs{resuming} "
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
        progress = _progress(self.total, self.answered, self.args.quiet)
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
            return EXIT_INTERRUPTED
        finally:
            progress(0, self.failed, close=True)
        if scheduler.stopped:
            self._save(state="cancelled")
            print(f"pipeq bulk: {self.bulk_id} cancelled with {self.answered} of {self.total} "
                  "inputs answered; `--resume` continues it", file=sys.stderr)
            self._summary(scheduler)
            return EXIT_FAILED
        self._save(state="finished")
        self._summary(scheduler)
        return EXIT_OK

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
        return EXIT_FAILED

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
            _note(f"pipeq bulk: {self.args.input}: {bad.message}")
        elif self.reported_bad == MAX_REPORTED_BAD_LINES + 1:
            _note("pipeq bulk: more unreadable lines follow; counted in the summary")

    def _persist_pieces(self, chunk: Chunk) -> None:
        pieces = [[p.job_id, p.offsets] for p in chunk.pieces]
        self.redis.hset(self.key, f"chunk:{chunk.number}", json.dumps(pieces))

    def _cancel_requested(self) -> bool:
        return _text(self.redis.hget(self.key, "cancel") or "0") == "1"

    def _save(self, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        self.redis.hset(self.key, mapping={k: str(v) for k, v in fields.items()})
        self.redis.expire(self.key, self.ttl)

    def _summary(self, scheduler: ChunkScheduler) -> None:
        seconds = time.monotonic() - self.started
        session = self.answered - int(_read_state(self.redis, self.key).get("session_done", 0))
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


def run_bulk(args: argparse.Namespace) -> int:
    """Run ``pipeq bulk --task ... --input ... --output ...``."""
    from .logs import setup_logging

    settings = load_settings()
    setup_logging("WARNING", settings.log_json)
    return BulkRun(args, settings).run()


_tqdm_bar: Any = None


def _note(message: str) -> None:
    """A line on stderr that does not break the progress bar."""
    if _tqdm_bar is not None:
        _tqdm_bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _progress(total: int, initial: int, quiet: bool) -> Callable[..., None]:
    """A progress callback: a tqdm bar on a terminal (done/total, rate, ETA, failures)."""
    global _tqdm_bar
    from tqdm import tqdm

    # disable=None: tqdm stays quiet when stderr is not a terminal (logs, CI, pipes).
    bar = tqdm(total=total, initial=initial, unit="inputs", file=sys.stderr,
               disable=True if quiet else None, dynamic_ncols=True, smoothing=0.1)
    _tqdm_bar = bar if not bar.disable else None

    def update(count: int, failed: int, close: bool = False) -> None:
        global _tqdm_bar
        if count:
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(count)
        if close:
            bar.close()
            _tqdm_bar = None

    return update


# --- status and cancel from another shell --------------------------------------------------------


def bulk_status(settings: Settings, args: argparse.Namespace) -> int:
    """``pipeq bulk status ID``: state, progress, rate and chunks in flight of a bulk job."""
    from .client import Client

    client = Client.for_settings(settings)
    state = _read_state(client.redis, client.keys.bulk(args.bulk_id))
    if not state:
        print(f"pipeq bulk status: no bulk job {args.bulk_id} (never started, or its record "
              "expired)", file=sys.stderr)
        return EXIT_FAILED
    done, total = int(state.get("done", 0)), int(state.get("total", 0))
    elapsed = float(state.get("updated_at", 0)) - float(state.get("session_started", 0))
    rate = (done - int(state.get("session_done", 0))) / elapsed if elapsed > 0 else 0.0
    report = {
        "bulk_id": args.bulk_id, "state": state.get("state"), "total": total, "done": done,
        "producer_alive": _producer_alive(state),
        "failed": int(state.get("failed", 0)),
        "chunks_in_flight": sum(k.startswith("chunk:") for k in state),
        "cancel_requested": state.get("cancel") == "1",
        "inputs_per_s": round(rate, 1), "eta_s": round((total - done) / rate, 1) if rate else None,
        "updated_s_ago": round(time.time() - float(state.get("updated_at", time.time())), 1),
        "route": state.get("route"), "params": json.loads(state.get("params") or "{}"),
        "input": state.get("input"), "output": state.get("output"),
        "producer": f"pid {state.get('pid')} on {state.get('host')}",
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    percent = 100 * done / total if total else 100.0
    print(f"bulk {args.bulk_id}: {report['state']}, {done} of {total} answered ({percent:.1f}%), "
          f"{report['failed']} failed, {report['chunks_in_flight']} chunks in flight")
    if report["producer_alive"] is False and report["state"] == "running":
        print(f"  its producer ({report['producer']}) is gone: run the same command again "
              "to resume it")
    print(f"  {report['route']}  {report['input']} -> {report['output']}")
    eta = f", ETA {report['eta_s']}s" if report["eta_s"] is not None else ""
    print(f"  {report['inputs_per_s']} inputs/s{eta}; updated {report['updated_s_ago']}s ago by "
          f"{report['producer']}")
    return EXIT_OK


def _producer_alive(state: dict[str, str]) -> bool | None:
    """Whether the recorded producer process still runs (None: it runs on another host)."""
    if state.get("host") != socket.gethostname() or not state.get("pid", "").isdigit():
        return None
    try:
        os.kill(int(state["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def bulk_cancel(settings: Settings, args: argparse.Namespace) -> int:
    """``pipeq bulk cancel ID``: the running command stops scheduling; queued chunk jobs end."""
    from .client import Client, Job

    client = Client.for_settings(settings)
    key = client.keys.bulk(args.bulk_id)
    state = _read_state(client.redis, key)
    if not state:
        print(f"pipeq bulk cancel: no bulk job {args.bulk_id}", file=sys.stderr)
        return EXIT_FAILED
    # The flag first: the running command must see it before its jobs come back cancelled.
    client.redis.hset(key, "cancel", "1")
    if state.get("state") != "running" or _producer_alive(state) is False:
        client.redis.hset(key, "state", "cancelled")  # no running command will record it
    job_ids = [j for name, value in state.items() if name.startswith("chunk:")
               for j, _ in json.loads(value)]
    cancelled = sum(Job(client, job_id).cancel() for job_id in job_ids)
    print(f"bulk {args.bulk_id}: cancel requested; {cancelled} queued chunk job(s) cancelled, "
          f"{len(job_ids) - cancelled} already running or done")
    return EXIT_OK
