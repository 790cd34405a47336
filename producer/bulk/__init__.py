"""Bulk work: any number of inputs in chunked, back-pressured, resumable jobs, answered in
input order (``RemotePipeline.map`` and ``pipeq bulk``)."""

from pipeq.bulk.chunks import ItemError

__all__ = ["ItemError"]
