# syntax=docker/dockerfile:1
# GPU steps (distill with a local teacher, sft, rl, evaluate) and multi-node DeepSpeed SFT:
# the library with the train, pipeline and gpu extras (TRL, PEFT, DeepSpeed, Liger) on the
# CUDA build of torch. Build from the repository root:
#   docker build -f infra/docker/train.Dockerfile -t ghcr.io/cellpuzzles/cellpuzzles-train:0.1.0 .
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# The CUDA build of torch that matches the base image's CUDA major version.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu's python3 (3.12) in a venv (the system interpreter is externally managed, PEP 668);
# g++ and ninja for the DeepSpeed ops it compiles on first use.
# DL3008 (pin apt versions) is ignored here: these come from Ubuntu's archive with its security
# updates, and pinning their patch versions breaks the build whenever the archive moves on.
# The base image tag is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ninja-build \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && useradd --create-home --uid 10001 --user-group cellpuzzles

WORKDIR /opt/cellpuzzles
COPY pyproject.toml README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines

RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0 \
    && pip install --no-cache-dir "/opt/cellpuzzles[train,pipeline,gpu]"

USER 10001
WORKDIR /home/cellpuzzles
# No HEALTHCHECK: training containers run to completion (Kubernetes ignores it anyway).
ENTRYPOINT ["cellpuzzles"]
CMD ["--help"]
