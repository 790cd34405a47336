"""The deployment's Celery app for Celery's own tools: ``celery -A pipeq ...``.

``celery -A pipeq`` finds this module (Celery looks for ``pipeq.celery`` when the package
has no ``app``) and its :data:`app`: the same configuration the workers, ``pipeq flower``
and ``pipeq status`` use, built from the ``PIPEQ_*`` settings, so every broker key, event and
control message is looked for under the deployment's prefix::

    celery -A pipeq inspect ping|stats|active|reserved|active_queues
    celery -A pipeq events --dump
    celery -A pipeq flower --basic-auth=user:password

The app only talks to workers; it does not run pipeq jobs (``pipeq worker`` does). Imported
by nothing else in pipeq: it reads the settings when Celery's command line imports it.
"""

from __future__ import annotations

from pipeq.core.celery_config import make_celery
from pipeq.core.config import load_settings

#: The Celery app ``celery -A pipeq`` uses.
app = make_celery(load_settings())
