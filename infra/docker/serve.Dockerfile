# syntax=docker/dockerfile:1
# The KServe predictor for the project's models (ServingRuntime cellpuzzles-runtime).
# KServe's storage initializer puts the model folder at /mnt/models.
# Build from the repository root:
#   docker build -f infra/docker/serve.Dockerfile -t ghcr.io/cellpuzzles/cellpuzzles-serve:0.1.0 .
# For GPU serving pass --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# (those wheels carry their own CUDA libraries).
FROM python:3.11.13-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN useradd --create-home --uid 10001 --user-group cellpuzzles

WORKDIR /opt/cellpuzzles
COPY pyproject.toml README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines

RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0 \
    && pip install --no-cache-dir "/opt/cellpuzzles[train,serve]"

USER 10001
WORKDIR /home/cellpuzzles
EXPOSE 8080
# No HEALTHCHECK: KServe probes the predictor over HTTP (Kubernetes ignores HEALTHCHECK).
ENTRYPOINT ["cellpuzzles"]
# --host 0.0.0.0: reachable from outside the container (cellpuzzles serve binds 127.0.0.1 by default)
CMD ["serve", "--model", "/mnt/models", "--port", "8080", "--host", "0.0.0.0"]
