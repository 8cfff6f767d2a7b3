# syntax=docker/dockerfile:1
# MLflow tracking server for the local stack (infra/compose): the official image plus the
# Postgres driver (backend store) and boto3 (S3/MinIO artifact store). Keep MLFLOW_VERSION
# inside pyproject's mlflow range (tests/infra checks it).
#   docker build -f infra/docker/mlflow.Dockerfile -t gram-mlflow:3.17.2 infra/docker
ARG MLFLOW_VERSION=3.17.2
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}

RUN pip install --no-cache-dir "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2"

# Unprivileged at run time.
RUN useradd --create-home --uid 10001 mlflow
USER mlflow
