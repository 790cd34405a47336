# syntax=docker/dockerfile:1
# pipeq GPU worker: one pinned `pipeq worker` process per container (one container per GPU).
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t pipeq-worker .
#   docker build -f docker/worker.Dockerfile \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       --build-arg BAKE_MODEL=sentence-transformers/all-MiniLM-L6-v2 -t pipeq-worker .

# The torch wheel brings its own CUDA libraries; the base image supplies the matching
# user-space runtime + cuDNN and the NVIDIA container-toolkit wiring (NVIDIA_* env).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

# Extra package index for torch only, e.g. https://download.pytorch.org/whl/cu128 to pick
# a specific CUDA build. Empty = PyPI, whose Linux x86_64 torch wheel is already CUDA-enabled.
# The torch *version* is pinned by pyproject.toml's `worker` extra, never here.
ARG TORCH_INDEX_URL=""
# Hugging Face model id to download into the image at build time. Empty (default) = no
# model baked in; the worker fetches it into the /models volume on first start.
ARG BAKE_MODEL=""
ARG BAKE_REVISION="main"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models

# Python 3.11 from Ubuntu 22.04 (jammy-updates, universe). ffmpeg is left out: add it
# if you serve audio pipelines that decode compressed audio.
# DL3008 (pin apt versions): jammy-updates replaces versions; a pin would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv "$VIRTUAL_ENV" \
    && pip install "pip==25.3" "setuptools==80.9.0" "wheel==0.45.1"

RUN groupadd --system --gid 10001 pipeq \
    && useradd --system --uid 10001 --gid pipeq --create-home --home-dir /home/pipeq pipeq \
    && mkdir -p /models /app \
    && chown pipeq:pipeq /models

WORKDIR /app

# Dependencies first, in their own layer: torch is GBs, so only a pyproject.toml change
# should re-download it. Empty package stubs (pyproject lists every package) let pip
# resolve `.[worker]` before the source is copied; the real source is installed (without deps) in the next layer.
# README.md is pyproject's `readme`; the glob keeps a checkout without it buildable.
COPY pyproject.toml README.md* ./
# DL3013 (pin pip packages): "." is pipeq itself; torch is pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN for pkg in producer producer/core producer/bulk producer/ops worker worker/batching \
               worker/broker worker/model worker/ops; do \
        mkdir -p "$pkg" && touch "$pkg/__init__.py"; \
    done \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[worker]" \
    && rm -rf producer worker build ./*.egg-info

COPY producer ./producer
COPY worker ./worker
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# The pipeq user, by id (a name may not resolve on the host).
USER 10001:10001

# Optional: bake a model into the image (offline / air-gapped hosts). Runs before VOLUME,
# because changes under a declared volume path are discarded by later build steps.
RUN if [ -n "$BAKE_MODEL" ]; then \
        python -c "import sys; from huggingface_hub import snapshot_download; \
snapshot_download(sys.argv[1], revision=sys.argv[2])" "$BAKE_MODEL" "$BAKE_REVISION"; \
    fi

# Hugging Face cache (HF_HOME): mount a named volume so models are downloaded once and
# shared by all worker containers on the host.
VOLUME ["/models"]

# Healthy only once a live worker answers for the configured routes; compose narrows this
# to the container's own --task/--model with --route-task/--route-model. The long start
# period covers the first model download and load onto the GPU.
HEALTHCHECK --interval=30s --timeout=20s --start-period=600s --retries=3 \
    CMD ["pipeq", "status"]

# Celery warm shutdown: SIGTERM finishes the in-flight batch, then exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pipeq", "worker"]
