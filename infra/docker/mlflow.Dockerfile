# syntax=docker/dockerfile:1
# The MLflow tracking server (infra/k8s/mlflow.yaml). The upstream ghcr.io/mlflow/mlflow image
# lacks the PostgreSQL driver (mlflow/mlflow#9513), so this one adds it and the GCS client.
# Needs nothing from the repository:
#   docker build -f infra/docker/mlflow.Dockerfile -t ghcr.io/cellpuzzles/mlflow-server:3.17.2 infra/docker
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.10 google-cloud-storage==3.17.1 \
    && useradd --create-home --uid 10001 --user-group mlflow

USER 10001
WORKDIR /home/mlflow
EXPOSE 5000
# No HEALTHCHECK: the Deployment probes /health (Kubernetes ignores HEALTHCHECK).
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
