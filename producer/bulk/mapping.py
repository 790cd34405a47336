"""``RemotePipeline.map``: every input of an iterable through a route, answers in order."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pipeq.bulk.cache import ResultCache
from pipeq.bulk.chunks import Chunk, ItemError
from pipeq.bulk.scheduler import ChunkScheduler
from pipeq.core.params import validate_params
from pipeq.errors import JobFailed, ValidationError

if TYPE_CHECKING:
    from pipeq.remote import RemotePipeline


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
    are not run again (``pipeq.bulk.cache``).
    """
    if on_error not in ("raise", "record"):
        raise ValidationError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    clean = check_bulk_options(remote, chunk_size, max_in_flight, params)
    remote.check_workers()
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
