# syntax=docker/dockerfile:1
# pipeq producer-side image: no torch, no GPU. Two targets from one file:
#   producer (default) - `pip install .`: submit jobs, `pipeq status`, ...
#   monitor            - adds the `monitor` extra (Flower + prometheus-client) for
#                        `pipeq flower` and `pipeq metrics`.
#   gateway            - adds the `gateway` extra (FastAPI, uvicorn) for `pipeq gateway`.
# Build from the repository root:
#   docker build -f docker/producer.Dockerfile -t pipeq .
#   docker build -f docker/producer.Dockerfile --target monitor -t pipeq-monitor .
#   docker build -f docker/producer.Dockerfile --target gateway -t pipeq-gateway .

FROM python:3.11-slim AS base

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 pipeq \
    && useradd --system --uid 10001 --gid pipeq --create-home --home-dir /home/pipeq pipeq

WORKDIR /app
# README.md is pyproject's `readme`; the glob keeps a checkout without it buildable.
COPY pyproject.toml README.md* ./
COPY producer ./producer
COPY worker ./worker
# Core dependencies only (celery, redis, pydantic, ...). Never an extra that pulls torch.
# DL3013 (pin pip packages): "." is pipeq itself; its dependencies are bounded in pyproject.
# hadolint ignore=DL3013
RUN pip install . && rm -rf build ./*.egg-info
# The pipeq user, by id (a name may not resolve on the host).
USER 10001:10001


FROM base AS monitor
USER 0
# hadolint ignore=DL3013
RUN pip install ".[monitor]" && rm -rf build ./*.egg-info
USER 10001:10001
EXPOSE 5555 9808
ENTRYPOINT ["pipeq"]
CMD ["flower"]


FROM base AS gateway
USER 0
# hadolint ignore=DL3013
RUN pip install ".[gateway]" && rm -rf build ./*.egg-info
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["pipeq"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8080"]


# Last stage = default target of a plain `docker build`.
FROM base AS producer
ENTRYPOINT ["pipeq"]
CMD ["--help"]
