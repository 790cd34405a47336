"""The exit codes of every ``pipeq`` command, in one table.

======  ====================================================================================
code    meaning
======  ====================================================================================
0       success
1       the job failed, was cancelled or expired; a bulk job was cancelled or stopped;
        ``cancel``: the job had ended already, nothing was cancelled
2       bad usage, bad settings or bad input (nothing was enqueued)
3       no live worker serves the route (``status``: a route is down); ``worker``: the
        model cannot be loaded
4       timed out waiting for a job (``result`` without ``--wait``: the job has not ended)
5       Redis cannot be reached
6       no job has this id (never submitted to this deployment, or its record expired)
130     interrupted (Ctrl-C)
======  ====================================================================================
"""

from __future__ import annotations

from enum import IntEnum

from pipeq.errors import (
    BrokerUnavailable,
    ConfigError,
    JobNotFound,
    JobTimeout,
    NoWorkerError,
    PipeqError,
    ValidationError,
)


class Exit(IntEnum):
    """Exit codes of the ``pipeq`` commands."""

    OK = 0
    FAILED = 1
    USAGE = 2
    NO_WORKER = 3
    TIMEOUT = 4
    BROKER = 5
    NOT_FOUND = 6
    INTERRUPTED = 130

    #: ``pipeq worker``: the route's model cannot be loaded (a restart will not help).
    MODEL_LOAD_FAILED = 3


#: Exit code of each error, most specific first (the first match wins).
_BY_ERROR: tuple[tuple[type[PipeqError], Exit], ...] = (
    (ValidationError, Exit.USAGE),
    (ConfigError, Exit.USAGE),
    (NoWorkerError, Exit.NO_WORKER),
    (JobTimeout, Exit.TIMEOUT),
    (BrokerUnavailable, Exit.BROKER),
    (JobNotFound, Exit.NOT_FOUND),
    (PipeqError, Exit.FAILED),
)


def exit_code(error: PipeqError) -> Exit:
    """The exit code a command ends with when ``error`` stops it."""
    return next(code for kind, code in _BY_ERROR if isinstance(error, kind))
