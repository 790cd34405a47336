"""``pipeq worker``: serve one route, on one device or one pinned process per GPU."""

from __future__ import annotations

import argparse
import logging
import sys

from producer.config import RouteSpec, Settings, load_settings
from producer.errors import ConfigError
from producer.logs import setup_logging

log = logging.getLogger("pipeq.worker")

EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's command-line options (also shown by ``pipeq worker --help``)."""
    parser.add_argument("--task", help="pipeline task, e.g. text-generation")
    parser.add_argument("--model", help="hub id or local directory of the model")
    parser.add_argument("--revision", help="model revision (branch, tag or commit)")
    parser.add_argument("--tokenizer", help="tokenizer id or directory, if not the model's")
    parser.add_argument("--device", help="cpu, cuda:N or auto (default: the route's, else auto)")
    parser.add_argument("--gpus", help="one pinned worker process per GPU: '0,1' or 'all'")
    parser.add_argument("--dtype", help="torch dtype to load the model in, e.g. float16")
    parser.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="allow the model repo's own code to run (off by default)")
    parser.add_argument("--max-batch-size", type=int, help="inputs per pipeline call")
    parser.add_argument("--max-wait-ms", type=float,
                        help="how long a batch waits to fill, under load")
    parser.add_argument("--max-batch-tokens", type=int, help="padded-length budget per call")
    parser.add_argument("--cpu-instances", type=int, metavar="N",
                        help="on a CPU: pipeline calls run side by side, each on cores/N "
                             "threads (default 0: automatic, 2 with 2+ cores; GPUs: 1)")
    parser.add_argument("--allow-urls", action="store_true", default=None,
                        help="fetch http(s) URLs given as image/audio inputs (off by default)")
    parser.add_argument("--max-payload-bytes", type=int,
                        help="largest image/audio payload per input (default "
                             "PIPEQ_MAX_PAYLOAD_BYTES)")
    parser.add_argument("--concurrency", type=int, help="job threads (default 2x batch size)")
    parser.add_argument("--hostname", help="unique Celery hostname (default: derived)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics on this port (off by default; with "
                             "--gpus, GPU N's process uses PORT+N)")
    parser.add_argument("--gpu-slot", type=int, help=argparse.SUPPRESS)


def route_spec(args: argparse.Namespace, settings: Settings) -> RouteSpec:
    """The route to serve: the routing table's entry, with command-line overrides."""
    if not args.task or not args.model:
        if len(settings.routes) == 1 and not (args.task or args.model):
            base = settings.routes[0]
        else:
            raise ConfigError("pipeq worker needs --task and --model (or exactly one route "
                              f"in {settings.routes_file})")
    else:
        from producer.contract import Route

        route = Route(task=args.task, model=args.model, revision=args.revision,
                      tokenizer=args.tokenizer)
        base = settings.route_spec(route) or RouteSpec(
            task=route.task, model=args.model, revision=args.revision, tokenizer=args.tokenizer)
    overrides = {
        "device": args.device, "dtype": args.dtype, "trust_remote_code": args.trust_remote_code,
        "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
        "max_batch_tokens": args.max_batch_tokens, "allow_urls": args.allow_urls,
        "cpu_instances": args.cpu_instances,
        "max_payload_bytes": args.max_payload_bytes,
    }
    merged = base.model_dump() | {k: v for k, v in overrides.items() if v is not None}
    return RouteSpec.model_validate(merged)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the worker command; returns the process exit code."""
    from .devices import DeviceError, parse_gpus, resolve_device, visible_gpu_ids

    try:
        settings = load_settings()
        setup_logging(settings.log_level, settings.log_json)
        spec = route_spec(args, settings)
        if args.gpus or spec.gpus:
            gpus_arg = args.gpus or (spec.gpus if isinstance(spec.gpus, str)
                                     else ",".join(map(str, spec.gpus or [])))
            # --device cpu with --gpus pins processes without using the GPUs (for testing).
            pin_only = (args.device or "").lower() == "cpu"
            ids = (parse_gpus(gpus_arg, visible_gpu_ids()) if not pin_only
                   else [int(g) for g in gpus_arg.split(",")])
            from .supervisor import Supervisor

            child_argv = _strip(argv, {"--gpus", "--device"})
            return Supervisor(child_argv, ids, "cpu" if pin_only else "cuda:0").run()
        device = resolve_device(spec.device)
    except (ConfigError, DeviceError, ValueError) as exc:
        print(f"pipeq worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from .main import default_hostname, serve

    hostname = args.hostname
    if args.gpu_slot is not None and not hostname:
        hostname = default_hostname(spec, f"gpu{args.gpu_slot}")
    metrics_port = args.metrics_port
    if metrics_port and args.gpu_slot is not None:
        metrics_port += args.gpu_slot  # one port per pinned process
    return serve(spec, settings, device, hostname=hostname, concurrency=args.concurrency,
                 metrics_port=metrics_port)


def _strip(argv: list[str], options: set[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in options:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m worker.cli`` (the supervisor's children)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pipeq worker", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
