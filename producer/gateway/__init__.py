"""``pipeq gateway``: the Python client's contract over HTTP, with API keys and webhooks.

Installed with the ``gateway`` extra (FastAPI on uvicorn, httpx); no torch. The app is built
by :func:`pipeq.gateway.app.create_app`; webhooks are delivered from a Redis outbox by
:mod:`pipeq.gateway.delivery`.
"""
