# syntax=docker/dockerfile:1
# Light pipeline steps (validate, puzzles, register, gate, deploy): the library with the
# train, pipeline and serve extras on the CPU build of torch.
# Build from the repository root:
#   docker build -f infra/docker/cpu.Dockerfile -t ghcr.io/cellpuzzles/cellpuzzles-cpu:0.1.0 .
FROM python:3.11.13-slim-bookworm

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

# torch first, from the CPU index: with no torch present pip would take the CUDA build (GBs).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir "/opt/cellpuzzles[train,pipeline,serve]"

USER 10001
WORKDIR /home/cellpuzzles
# No HEALTHCHECK: pipeline steps are run-to-completion containers (Kubernetes ignores it anyway).
ENTRYPOINT ["cellpuzzles"]
CMD ["--help"]
