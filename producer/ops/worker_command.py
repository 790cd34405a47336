"""``pipeq worker``: its options, and the route spec they describe.

The command is defined here, on the light side, so that ``pipeq --help`` needs no torch;
its callback hands the spec to ``pipeq.worker.start``, which imports the heavy parts.
"""

from __future__ import annotations

from typing import Any

import click
import pydantic

from pipeq.core.config import RouteSpec, Settings, validation_problems
from pipeq.core.contract import Route
from pipeq.errors import ConfigError
from pipeq.ops.cli import CONTEXT, settings_of

#: Options that override the routing table's entry for the route (None: not given).
_OVERRIDES = ("device", "dtype", "trust_remote_code", "max_batch_size", "max_wait_ms",
              "max_batch_tokens", "cpu_instances", "allow_urls", "max_payload_bytes", "batching")


@click.command(context_settings=CONTEXT)
@click.option("--task", help="Pipeline task, e.g. text-generation (default: the only route "
                             "of the routing table).")
@click.option("--model", help="Hub id or local directory of the model (required with --task).")
@click.option("--revision", help="Model revision: branch, tag or commit (default: the "
                                 "model's default branch).")
@click.option("--tokenizer", help="Tokenizer id or directory (default: the model's own).")
@click.option("--device", help="cpu, cuda:N, mps or auto (default: the route's, else auto: "
                                "the first GPU if there is one).")
@click.option("--gpus", help="One pinned worker process per GPU: '0,1' or 'all' (default: one "
                              "process on --device).")
@click.option("--dtype", help="Torch dtype to load the model in, e.g. float16 (default: the "
                               "model's own).")
@click.option("--trust-remote-code", is_flag=True, default=None,
              help="Let the model repository's own code run (default: off).")
@click.option("--max-batch-size", type=int, help="Inputs per pipeline call (default: 32).")
@click.option("--max-wait-ms", type=float,
              help="Under load, how long a batch waits to fill (default: 5).")
@click.option("--max-batch-tokens", type=int,
              help="Cap on padded length x batch size per call (default: 0, no cap).")
@click.option("--cpu-instances", type=int, metavar="N",
              help="On a CPU, pipeline calls run side by side, each on cores/N threads "
                   "(default: 0 = automatic, 2 with 2+ cores; GPUs always 1). With one "
                   "thread per instance a lone request's call runs on every core.")
@click.option("--batching", type=click.Choice(["static", "continuous"]),
              help="static: micro-batches run to their longest input's end; continuous "
                   "(text-generation): requests join and leave the running batch at every "
                   "decoding step (default: static).")
@click.option("--allow-urls", is_flag=True, default=None,
              help="Fetch http(s) URLs given as image/audio inputs (default: off).")
@click.option("--max-payload-bytes", type=int,
              help="Largest image/audio payload per input (default: PIPEQ_MAX_PAYLOAD_BYTES).")
@click.option("--prefetch", type=int, metavar="N",
              help="Messages this worker holds at once (default: 4 x max batch size x model "
                   "instances: a gather's worth per instance).")
@click.option("--hostname", help="Unique Celery hostname (default: pipeq.<route>.<device>."
                                 "<pid>@<host>).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), metavar="PORT",
              help="Serve this process's Prometheus metrics on PORT (default: off; with "
                   "--gpus, GPU N's process uses PORT+N).")
@click.option("--metrics-address", default="0.0.0.0", show_default=True,
              help="Address the --metrics-port exporter listens on.")
@click.option("--gpu-slot", type=int, hidden=True)
@click.pass_context
def worker(ctx: click.Context, **options: Any) -> None:
    """Serve one route: load its pipeline once, warm it up, consume its queue.

    Logs "pipeq worker ready: ..." once it consumes. Exits 3 when the model cannot be
    loaded, 2 on bad options (e.g. --gpus naming a GPU this machine lacks).
    """
    from pipeq.worker.start import WorkerRun

    settings = settings_of(ctx)
    spec = route_spec(options, settings)
    argv = list(ctx.find_root().obj.get("argv", []))
    argv = argv[argv.index("worker") + 1:] if "worker" in argv else []
    ctx.exit(WorkerRun(spec, settings, options, argv).run())


def route_spec(options: dict[str, Any], settings: Settings) -> RouteSpec:
    """The route to serve: the routing table's entry, with command-line overrides."""
    task, model = options.get("task"), options.get("model")
    if not task or not model:
        if len(settings.routes) == 1 and not (task or model):
            base = settings.routes[0]
        else:
            raise ConfigError("pipeq worker needs --task and --model (or exactly one route "
                              f"in {settings.routes_file})")
    else:
        route = Route(task=task, model=model, revision=options.get("revision"),
                      tokenizer=options.get("tokenizer"))
        base = settings.route_spec(route) or RouteSpec(
            task=route.task, model=model, revision=route.revision, tokenizer=route.tokenizer)
    given = {name: options.get(name) for name in _OVERRIDES}
    merged = base.model_dump() | {k: v for k, v in given.items() if v is not None}
    try:
        return RouteSpec.model_validate(merged)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"pipeq worker: {validation_problems(exc)}") from None
