"""The ``pipeq`` command: serve routes, submit jobs, fetch results, look at a deployment.

Each subcommand says what it does in ``pipeq <command> --help``; exit codes are in
``pipeq.ops.exits`` (and the README). Heavy parts (the worker, Flower, the exporter) are
imported only by the subcommand that runs them: ``pipeq submit`` stays light.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click
import redis

from pipeq.core.config import Settings, load_settings
from pipeq.core.contract import JobState
from pipeq.errors import JobTimeout, NoWorkerError, PipeqError
from pipeq.ops.exits import Exit, exit_code

if TYPE_CHECKING:
    from pipeq.job import Job

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

#: A TCP port option's type: 0-65535 (0: any free port), refused by click otherwise.
PORT = click.IntRange(0, 65535)


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON (what ``--json`` and results print)."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def parse_param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--param``: VALUE is parsed as JSON when it can be, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"takes KEY=VALUE (e.g. max_new_tokens=20), got {text!r}",
                                 param_hint="--param")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def param_option(func: F) -> F:
    """The ``--param KEY=VALUE`` option (repeatable)."""
    return click.option(
        "--param", "params", multiple=True, metavar="KEY=VALUE",
        help="A call parameter, e.g. max_new_tokens=20 (repeatable; VALUE is parsed as JSON "
             "when it can be, else taken as text; default: none, the pipeline's defaults).")(func)


def settings_of(ctx: click.Context) -> Settings:
    """The settings, loaded once per command (a ConfigError exits 2)."""
    obj = ctx.ensure_object(dict)
    if "settings" not in obj:
        obj["settings"] = load_settings()
    settings: Settings = obj["settings"]
    return settings


def quiet_logging(settings: Settings, level: str = "WARNING") -> None:
    """Warnings only for short commands (long-running ones log at the settings' level)."""
    from pipeq.core.logs import setup_logging

    setup_logging(level, settings.log_json)


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="pipeq", prog_name="pipeq")
def cli() -> None:
    """pipeq: transformers.pipeline() as a durable, batched job service on Celery and Redis.

    Settings come from PIPEQ_* environment variables and settings/ (see `pipeq config`).
    Exit codes: 0 ok; 1 job failed, cancelled or expired; 2 bad usage, settings or input;
    3 no live worker (or, for `worker`, the model cannot be loaded); 4 timed out;
    5 Redis unreachable; 6 no job has this id; 130 interrupted.
    """


@cli.command()
@click.option("--task", required=True, help="Pipeline task, e.g. text-classification.")
@click.option("--model", required=True, help="Hub id or model directory the workers serve.")
@click.option("--revision", help="Model revision (default: the route's, i.e. the model's "
                                 "default branch).")
@param_option
@click.option("--wait", is_flag=True, help="Wait for the job and print its result (default: "
                                           "print the job id at once).")
@click.option("--timeout", type=float, help="The job's deadline and the wait, in seconds "
                                            "(default: PIPEQ_DEFAULT_TIMEOUT_S).")
@click.option("--no-require-worker", is_flag=True,
              help="Enqueue even when no live worker serves the route (default: refuse).")
@click.option("--stream", is_flag=True,
              help="text-generation: print the generated text as it is made, then exit with "
                   "the job's status (several inputs or sequences: one JSON line per piece).")
@click.argument("inputs", nargs=-1, required=True)
@click.pass_context
def submit(ctx: click.Context, task: str, model: str, revision: str | None,
           params: tuple[str, ...], wait: bool, timeout: float | None,
           no_require_worker: bool, stream: bool, inputs: tuple[str, ...]) -> None:
    """Submit a job: one INPUT is a single call, several are a list call."""
    from pipeq.remote import no_worker_message, pipeline

    settings = settings_of(ctx)
    quiet_logging(settings)
    remote = pipeline(task, model=model, revision=revision, settings=settings)
    call: Any = inputs[0] if len(inputs) == 1 else list(inputs)
    try:
        job = remote.submit(call, timeout=timeout, require_worker=not no_require_worker,
                            stream=stream, **dict(parse_param(p) for p in params))
    except NoWorkerError:  # say how to queue anyway with this command, not in Python
        raise NoWorkerError(no_worker_message(remote.route, "pass --no-require-worker")
                            ) from None
    if stream:
        plain = len(inputs) == 1 and job_params_single_sequence(params)
        for piece in job.stream(timeout):
            if plain:
                click.echo(piece.text, nl=False)
            else:
                click.echo(json.dumps({"index": piece.index, "seq": piece.seq,
                                       "text": piece.text}))
        if plain:
            click.echo()
        return
    if not wait:
        click.echo(job.id)
        return
    print_result(job, timeout, f"it goes on: wait again with `pipeq result {job.id} --wait`, "
                 f"or stop it with `pipeq cancel {job.id}`")


@cli.command()
@click.argument("job_id")
@click.option("--wait", is_flag=True, help="Wait for the job to end (default: exit 4 at once "
                                           "if it has not).")
@click.option("--timeout", type=float, help="Seconds to wait with --wait (default: "
                                            "PIPEQ_DEFAULT_TIMEOUT_S).")
@click.pass_context
def result(ctx: click.Context, job_id: str, wait: bool, timeout: float | None) -> None:
    """Print a job's result (exit 1 if it failed, was cancelled or expired)."""
    from pipeq.remote import get_job

    settings = settings_of(ctx)
    quiet_logging(settings)
    job = get_job(job_id, settings)
    if not wait and not job.done():  # an unknown id raises JobNotFound: exit 6
        click.echo(f"job {job.id} is {job.status()}", err=True)
        ctx.exit(Exit.TIMEOUT)
    print_result(job, timeout, "wait longer with --timeout, or stop it with "
                 f"`pipeq cancel {job.id}`")


def job_params_single_sequence(params: tuple[str, ...]) -> bool:
    """True unless ``--param num_return_sequences=N`` asks for more than one sequence."""
    return dict(parse_param(p) for p in params).get("num_return_sequences", 1) == 1


def print_result(job: Job, timeout: float | None, advice: str) -> None:
    """Print the job's result as JSON; a wait that times out says so, then ``advice``."""
    try:
        print_json(job.result(timeout))
    except JobTimeout as exc:
        raise JobTimeout(f"job {job.id} did not finish within {exc.waited_s:g}s (status "
                         f"{exc.state}); {advice}") from None


@cli.command()
@click.argument("job_id")
@click.pass_context
def cancel(ctx: click.Context, job_id: str) -> None:
    """Cancel a job: a queued job never runs; a running one's result is discarded.

    Exit 1 when the job had ended already (nothing is cancelled), 6 for an unknown id.
    """
    from pipeq.remote import get_job

    settings = settings_of(ctx)
    quiet_logging(settings)
    job = get_job(job_id, settings)
    before = job.cancel_from()
    if before.is_final:
        click.echo(f"job {job.id} had already ended ({before.value}): nothing was cancelled",
                   err=True)
        ctx.exit(Exit.FAILED)
    click.echo(f"job {job.id} cancelled" + ("" if before == JobState.PENDING else
               " (it was running: its batch finishes, its result is discarded)"))


@cli.command()
@click.option("--task", "--route-task", "task",
              help="Only this route's task, with --model (default: every route).")
@click.option("--model", "--route-model", "model",
              help="Only this route's model, with --task (default: every route).")
@click.option("--revision", "--route-revision", "revision",
              help="The route's revision, with --task and --model (default: the model's "
                   "default branch; \"main\" names the same route).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@click.pass_context
def status(ctx: click.Context, task: str | None, model: str | None, revision: str | None,
           as_json: bool) -> None:
    """Routes, live workers, queue depth, oldest job; exit 3 if a route is down.

    With --task and --model it checks that one route (a container health check).
    """
    from pipeq.ops.status import print_status

    settings = settings_of(ctx)
    quiet_logging(settings)
    ctx.exit(print_status(settings, task, model, revision, as_json))


@cli.command()
@click.pass_context
def config(ctx: click.Context) -> None:
    """Print the effective settings as JSON (secrets masked)."""
    print_json(settings_of(ctx).masked())


@cli.command()
@click.option("--port", type=PORT, default=5555, show_default=True, help="Port to listen on.")
@click.option("--address", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--insecure", is_flag=True,
              help="Run without credentials (when PIPEQ_FLOWER_USER/PASSWORD are unset).")
@click.pass_context
def flower(ctx: click.Context, port: int, address: str, insecure: bool) -> None:
    """Flower, the Celery dashboard, on this deployment (basic auth)."""
    from pipeq.ops.flower import FlowerOptions, run_flower

    settings = settings_of(ctx)
    quiet_logging(settings, settings.log_level)
    ctx.exit(run_flower(settings, FlowerOptions(port, address, insecure)))


@cli.command()
@click.option("--port", type=PORT, default=9808, show_default=True, help="Port to listen on.")
@click.option("--address", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.pass_context
def metrics(ctx: click.Context, port: int, address: str) -> None:
    """Prometheus exporter of queue depth, jobs and workers (read from Redis)."""
    from pipeq.ops.exporter import serve_metrics

    settings = settings_of(ctx)
    quiet_logging(settings, settings.log_level)
    ctx.exit(serve_metrics(settings, port, address))


@cli.command()
@click.argument("action", type=click.Choice(["list", "requeue", "drop", "purge"]),
                default="list")
@click.argument("entry_id", required=False)
@click.pass_context
def dead(ctx: click.Context, action: str, entry_id: str | None) -> None:
    """Dead letters (messages pipeq could not run): list, requeue ID, drop ID, purge."""
    from pipeq.ops.dead import run_dead

    settings = settings_of(ctx)
    quiet_logging(settings)
    ctx.exit(run_dead(settings, action, entry_id))


def _register_heavy_commands() -> None:
    from pipeq.bulk.command import bulk
    from pipeq.gateway.command import gateway
    from pipeq.ops.worker_command import worker

    cli.add_command(worker)
    cli.add_command(bulk)
    cli.add_command(gateway)


_register_heavy_commands()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pipeq`` command; returns its exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        # standalone_mode=False: click returns exit codes (ctx.exit) instead of exiting.
        code = cli.main(args=args, prog_name="pipeq", standalone_mode=False,
                        obj={"argv": args})
    except PipeqError as exc:
        command = next((a for a in args if not a.startswith("-")), "")
        click.echo(f"pipeq {command}: {exc}".replace("pipeq : ", "pipeq: "), err=True)
        return int(exit_code(exc))
    except redis.RedisError as exc:  # a Redis error nobody expected: say so, exit 5
        click.echo(f"pipeq: Redis failed: {exc}", err=True)
        return int(Exit.BROKER)
    except click.ClickException as exc:
        exc.show()
        return int(exc.exit_code)
    except OSError as exc:  # a file or a port the command was given cannot be used
        command = next((a for a in args if not a.startswith("-")), "")
        where = f" {exc.filename!r}" if getattr(exc, "filename", None) else ""
        click.echo(f"pipeq {command}: cannot use{where}: {exc.strerror or exc}", err=True)
        return int(Exit.USAGE)
    except click.Abort:
        click.echo("aborted", err=True)
        return int(Exit.INTERRUPTED)
    return code if isinstance(code, int) else int(Exit.OK)
