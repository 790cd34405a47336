"""``pipeq``: run workers, submit jobs, fetch results, cancel, and look at a deployment.

Exit codes: 0 success; 1 the job failed, was cancelled or expired; 2 bad usage or settings;
3 no live worker for a route (``status``: a route is unhealthy); 4 timed out; 5 Redis
unreachable. ``pipeq worker`` returns 3 when the model cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .errors import (
    BrokerUnavailable,
    ConfigError,
    JobTimeout,
    NoWorkerError,
    PipeqError,
    ValidationError,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_WORKER, EXIT_TIMEOUT, EXIT_BROKER = 0, 1, 2, 3, 4, 5

#: Exit code of each error, most specific first (the first match wins).
EXIT_CODES: tuple[tuple[type[PipeqError], int], ...] = (
    (ValidationError, EXIT_USAGE),
    (ConfigError, EXIT_USAGE),
    (NoWorkerError, EXIT_NO_WORKER),
    (JobTimeout, EXIT_TIMEOUT),
    (BrokerUnavailable, EXIT_BROKER),
    (PipeqError, EXIT_FAILED),
)


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param takes key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def build_parser() -> argparse.ArgumentParser:
    """The ``pipeq`` argument parser (``worker`` is parsed by ``worker.cli``)."""
    parser = argparse.ArgumentParser(prog="pipeq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="serve a route (see `pipeq worker --help`)", add_help=False)
    sub.add_parser("bulk", help="a file of inputs through a route, resumable; status; cancel "
                   "(see `pipeq bulk --help`)", add_help=False)

    submit = sub.add_parser("submit", help="submit a job; prints its id (or result with --wait)")
    submit.add_argument("--task", required=True)
    submit.add_argument("--model", required=True)
    submit.add_argument("--revision")
    submit.add_argument("--param", action="append", type=_parse_param, default=[],
                        metavar="KEY=VALUE", help="call parameter (VALUE parsed as JSON if it can)")
    submit.add_argument("--wait", action="store_true", help="wait and print the result")
    submit.add_argument("--timeout", type=float, help="job deadline and wait, in seconds")
    submit.add_argument("--no-require-worker", action="store_true",
                        help="enqueue even if no live worker serves the route")
    submit.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="one input (a single call) or several (a list call)")

    result = sub.add_parser("result", help="print a job's result")
    result.add_argument("job_id")
    result.add_argument("--wait", action="store_true", help="wait for the job to end")
    result.add_argument("--timeout", type=float)

    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")

    status = sub.add_parser("status", help="routes, live workers, queue depth; exit 3 if unhealthy")
    status.add_argument("--route-task", "--task", dest="task")
    status.add_argument("--route-model", "--model", dest="model")
    status.add_argument("--json", action="store_true")

    sub.add_parser("config", help="print the effective settings (secrets masked)")

    flower = sub.add_parser("flower", help="Flower dashboard on this deployment (basic auth)")
    flower.add_argument("--port", type=int, default=5555)
    flower.add_argument("--address", default="0.0.0.0", help="address to listen on")
    flower.add_argument("--insecure", action="store_true",
                        help="run without credentials (PIPEQ_FLOWER_USER/PASSWORD unset)")

    dead = sub.add_parser("dead", help="dead letters: list, requeue ID, drop ID, purge")
    dead.add_argument("action", nargs="?", default="list",
                      choices=["list", "requeue", "drop", "purge"])
    dead.add_argument("entry_id", nargs="?", help="the dead letter's id (requeue, drop)")

    metrics = sub.add_parser("metrics", help="Prometheus exporter of queue depth, jobs, workers")
    metrics.add_argument("--port", type=int, default=9808)
    metrics.add_argument("--address", default="0.0.0.0", help="address to listen on")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pipeq`` command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        from worker.cli import main as worker_main  # heavy: only for this subcommand

        return worker_main(argv[1:])
    if argv and argv[0] == "bulk":
        from .bulk_cli import main as bulk_main  # parses its own options (and status/cancel)

        return bulk_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except PipeqError as exc:
        print(f"pipeq {args.command}: {exc}", file=sys.stderr)
        return next(code for kind, code in EXIT_CODES if isinstance(exc, kind))


def _dispatch(args: argparse.Namespace) -> int:
    from .config import load_settings

    settings = load_settings()
    if args.command == "config":
        _print_json(settings.masked())
        return EXIT_OK
    from .logs import setup_logging

    setup_logging("WARNING", settings.log_json)
    if args.command == "status":
        return _status(args, settings)
    if args.command == "dead":
        from .dead_cli import run_dead

        return run_dead(settings, args.action, args.entry_id)
    if args.command in ("flower", "metrics"):
        setup_logging(settings.log_level, settings.log_json)  # long-running: say what happens
        if args.command == "flower":
            from .monitor import FlowerOptions, run_flower

            return run_flower(settings, FlowerOptions(args.port, args.address, args.insecure))
        from .metrics import serve_metrics

        return serve_metrics(settings, args.port, args.address)
    from .client import Client, get_job, pipeline

    if args.command == "submit":
        remote = pipeline(args.task, model=args.model, revision=args.revision, settings=settings)
        inputs: Any = args.inputs[0] if len(args.inputs) == 1 else args.inputs
        job = remote.submit(inputs, timeout=args.timeout,
                            require_worker=not args.no_require_worker, **dict(args.param))
        if not args.wait:
            print(job.id)
            return EXIT_OK
        _print_json(job.result(args.timeout))
        return EXIT_OK
    job = get_job(args.job_id, settings)
    if args.command == "result":
        if not args.wait and not job.done():
            print(f"job {job.id} is {job.status()}", file=sys.stderr)
            return EXIT_TIMEOUT
        _print_json(job.result(args.timeout))
        return EXIT_OK
    if args.command == "cancel":
        was_pending = job.cancel()
        print(f"job {job.id} cancelled" + ("" if was_pending else
              f" (it had already started or ended; now {job.status()}: cancelling a running "
              "job is best-effort)"))
        return EXIT_OK
    del Client
    return EXIT_USAGE


def _status(args: argparse.Namespace, settings: Any) -> int:
    import redis

    from .contract import Route
    from .inspect import deployment_status

    only = Route(task=args.task, model=args.model) if args.task and args.model else None
    client = redis.Redis.from_url(settings.redis_url_value(), socket_timeout=10)
    try:
        statuses = deployment_status(settings, client, only)
    except redis.RedisError as exc:
        raise BrokerUnavailable(f"cannot read status from Redis: {exc}") from exc
    if args.json:
        _print_json([s.as_dict() for s in statuses])
    else:
        for s in statuses:
            mark = "ok " if s.healthy else "DOWN"
            age = f"{s.oldest_age_s:.1f}s" if s.oldest_age_s is not None else "-"
            print(f"[{mark}] {s.route.describe()}  workers={len(s.workers)} "
                  f"queued={s.queue_depth}{_bulk(s.lane_depths)} oldest={age}")
            for w in s.workers:
                print(f"       {w['hostname']} host={w.get('host', '-')} device={w['device']} "
                      f"ready={w['ready']} beat={w['last_beat_age_s']:.1f}s ago"
                      + _memory(w.get("device_memory_bytes")))
        if not statuses:
            print("no routes configured or announced")
    unhealthy = [s for s in statuses if (s.configured or only) and not s.healthy]
    return EXIT_NO_WORKER if unhealthy or (only and not statuses) else EXIT_OK


def _bulk(lane_depths: dict[str, int]) -> str:
    return f" (bulk {lane_depths['bulk']})" if lane_depths.get("bulk") else ""


def _memory(nbytes: Any) -> str:
    return f" memory={nbytes / 2**20:.0f}MiB" if isinstance(nbytes, int | float) else ""


if __name__ == "__main__":
    sys.exit(main())
