"""``pipeq bulk``: every input of a file through a route, in order, resumable, with progress.

    pipeq bulk --task T --model M --input docs.jsonl --output out.jsonl [--field text]
    pipeq bulk ... --resume          # after Ctrl-C, a crash or a reboot: continues
    pipeq bulk status BULK_ID        # from another shell
    pipeq bulk cancel BULK_ID        # stop scheduling; cancel the chunk jobs still queued

Running the same command again resumes a job (``pipeq.bulk.run``). Exit codes: those of
``pipeq``, plus 1 when the job was cancelled or stopped on a failed input (``--on-error
fail``), and 130 when interrupted (Ctrl-C).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pipeq.bulk.files import FORMATS
from pipeq.ops.cli import CONTEXT, param_option, parse_param, quiet_logging, settings_of


@click.group(context_settings=CONTEXT, invoke_without_command=True,
             epilog="Run the same command again to resume; `pipeq bulk status BULK_ID` and "
                    "`pipeq bulk cancel BULK_ID` work from another shell.")
@click.option("--task", help="Pipeline task, e.g. feature-extraction (required).")
@click.option("--model", help="Hub id or model directory the workers serve (required).")
@click.option("--revision", help="Model revision (default: the route's).")
@click.option("--input", "input_path", type=click.Path(path_type=Path),
              help="Input file (required): JSON Lines, text lines or CSV.")
@click.option("--output", "output_path", type=click.Path(path_type=Path),
              help="Output JSON Lines file (required): one line per input, in input order.")
@click.option("--format", "fmt", type=click.Choice(FORMATS),
              help="Input format (default: from the file name; text otherwise).")
@click.option("--field", help="JSON Lines: the field holding the input (default: text).")
@click.option("--column", help="CSV: column number (0-based) or header name (default: 0).")
@param_option
@click.option("--chunk-size", type=int, default=64, show_default=True, help="Inputs per job.")
@click.option("--max-in-flight", type=int, default=8, show_default=True,
              help="Chunks sent and not yet written.")
@click.option("--timeout", type=float,
              help="Deadline of each chunk job, in seconds (default: PIPEQ_DEFAULT_TIMEOUT_S).")
@click.option("--resume", is_flag=True,
              help="Continue an existing output file (even one Redis does not know).")
@click.option("--on-error", type=click.Choice(["record", "fail"]), default="record",
              show_default=True, help="A failed input: record its error in the output, or stop.")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable line (default: "
                                             "answer it with a BadInput error).")
@click.option("--cache", is_flag=True,
              help="Answer inputs already answered within PIPEQ_RESULT_TTL_S (same route and "
                   "parameters) from Redis instead of running them again.")
@click.option("--id", "bulk_id", help="Bulk job id (default: derived from the input file, "
                                      "route and parameters).")
@click.option("--no-require-worker", is_flag=True,
              help="Start even if no live worker serves the route yet.")
@click.option("--quiet", is_flag=True, help="No progress bar (default: one on a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def bulk(ctx: click.Context, **options: Any) -> None:
    """Every input of a file through a route, answered in input order, resumable."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [f"--{name}" for name, key in (("task", "task"), ("model", "model"),
                                              ("input", "input_path"), ("output", "output_path"))
               if not options[key]]
    if missing:
        raise click.UsageError(f"missing option(s) {', '.join(missing)}", ctx)
    from pipeq.bulk.run import BulkOptions, BulkRun

    settings = settings_of(ctx)
    quiet_logging(settings)
    params = tuple(parse_param(p) for p in options.pop("params"))
    renamed = {"input": options.pop("input_path"), "output": options.pop("output_path"),
               "format": options.pop("fmt"), "json": options.pop("as_json")}
    ctx.exit(BulkRun(BulkOptions(params=params, **renamed, **options), settings).run())


@bulk.command("status")
@click.argument("bulk_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@click.pass_context
def status(ctx: click.Context, bulk_id: str, as_json: bool) -> None:
    """A bulk job's state, progress, rate and chunks in flight."""
    from pipeq.bulk.control import bulk_status

    ctx.exit(bulk_status(settings_of(ctx), bulk_id, as_json))


@bulk.command("cancel")
@click.argument("bulk_id")
@click.pass_context
def cancel(ctx: click.Context, bulk_id: str) -> None:
    """Stop a bulk job: its command stops scheduling; queued chunk jobs are cancelled."""
    from pipeq.bulk.control import bulk_cancel

    ctx.exit(bulk_cancel(settings_of(ctx), bulk_id))
