"""One error hierarchy for pipeq: everything a caller can catch derives from PipeqError.

Retryable errors (the same request may succeed later) are kept apart from fatal ones
(the request itself is wrong and will never succeed), so that callers and the worker's
retry policy can tell them apart with one ``isinstance`` check.
"""

from __future__ import annotations


class PipeqError(Exception):
    """Raised for any pipeq failure; the base class of every error below."""


class RetryableError(PipeqError):
    """Raised when the same request may succeed if tried again later."""


class FatalError(PipeqError):
    """Raised when the request can never succeed as it is."""


class ValidationError(FatalError, ValueError):
    """Raised when a request, a setting or a message is malformed; nothing was enqueued."""


class ConfigError(FatalError):
    """Raised when pipeq's settings (env, settings/*.toml) are missing or inconsistent."""


class UnsupportedTaskError(ValidationError):
    """Raised when a task name is not served by the transformers version pipeq targets."""


class NoWorkerError(RetryableError):
    """Raised when no live worker serves the route a job was submitted to."""


class BrokerUnavailable(RetryableError):
    """Raised when Redis cannot be reached after the bounded connection retry."""


class NotReplicated(BrokerUnavailable):
    """Raised when fewer replicas than PIPEQ_REDIS_WAIT_REPLICAS confirmed a submitted job in
    time: it is queued on the primary, but a failover now could lose it."""

    def __init__(self, message: str, *, job_id: str = ""):
        self.job_id = job_id
        super().__init__(message)


class JobTimeout(RetryableError, TimeoutError):
    """Raised when a job's result did not arrive within the caller's timeout."""

    def __init__(self, message: str, *, job_id: str = "", waited_s: float = 0.0,
                 state: str = "unknown"):
        self.job_id = job_id
        self.waited_s = waited_s
        #: The job's state when the wait ended (it goes on running).
        self.state = state
        super().__init__(message)


class JobNotFound(PipeqError, LookupError):
    """Raised when no job has the id asked for: never submitted to this deployment, or its
    record expired (records are kept ``PIPEQ_RESULT_TTL_S``)."""


class JobFailed(PipeqError):
    """Raised when a job ended in FAILURE; carries the remote error type and message."""

    def __init__(self, job_id: str, error_type: str, message: str, retryable: bool = False):
        self.job_id = job_id
        self.error_type = error_type
        self.remote_message = message
        self.retryable = retryable
        super().__init__(f"job {job_id} failed: {error_type}: {message}")


class JobCancelled(JobFailed):
    """Raised when the result of a cancelled job is asked for."""

    def __init__(self, job_id: str, message: str = "the job was cancelled"):
        super().__init__(job_id, "JobCancelled", message)


class JobLost(JobFailed):
    """Raised when a job's record vanished before it ended (Redis lost its data, e.g. a
    restart without persistence): it will never finish; submitting it again may succeed."""

    def __init__(self, job_id: str, message: str = "the job's record vanished from Redis "
                 "before it ended (Redis lost its data?); it will never finish: submit it "
                 "again"):
        super().__init__(job_id, "JobLost", message, retryable=True)


class JobExpired(JobFailed):
    """Raised when a job's deadline passed before a worker could run it."""

    def __init__(self, job_id: str, message: str = "the job's deadline passed while queued"):
        super().__init__(job_id, "JobExpired", message)


class StreamError(PipeqError):
    """Raised when a job's streamed text cannot be read as one coherent text; the job goes
    on, and ``job.result()`` still gives its final result."""


class StreamNotSupported(ValidationError):
    """Raised when streaming is asked of a job that cannot stream (not text generation,
    or beam search); nothing was enqueued."""
