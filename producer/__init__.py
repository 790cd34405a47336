"""pipeq's producer side: submit transformers pipeline jobs to Redis, get results back.

Light by design: imports neither torch nor transformers nor the worker package.
"""

from .client import Job, RemotePipeline, get_job, pipeline
from .config import Settings, load_settings
from .errors import (
    BrokerUnavailable,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobTimeout,
    NoWorkerError,
    PipeqError,
    ValidationError,
)

__all__ = [
    "BrokerUnavailable",
    "Job",
    "JobCancelled",
    "JobExpired",
    "JobFailed",
    "JobTimeout",
    "NoWorkerError",
    "PipeqError",
    "RemotePipeline",
    "Settings",
    "ValidationError",
    "get_job",
    "load_settings",
    "pipeline",
]
