"""pipeq: Hugging Face ``transformers.pipeline()`` as a durable, batched job service.

    from pipeq import pipeline

    classify = pipeline("text-classification", model="distilbert-base-uncased-finetuned-sst-2")
    classify("I love it")                   # what the local pipeline returns
    job = classify.submit(["a", "b"])        # a Job handle: status(), result(), cancel()

This package (the producer side, and the contract both sides share in ``pipeq.core``) is
light: it imports neither torch nor transformers nor ``pipeq.worker``. Errors live in
``pipeq.errors``; settings come from ``PIPEQ_*`` variables and ``settings/``.
"""

from importlib.metadata import PackageNotFoundError, version

from pipeq.core.config import Settings, load_settings
from pipeq.job import Job
from pipeq.remote import RemotePipeline, get_job, pipeline

try:
    __version__ = version("pipeq")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Job",
    "RemotePipeline",
    "Settings",
    "__version__",
    "get_job",
    "load_settings",
    "pipeline",
]
