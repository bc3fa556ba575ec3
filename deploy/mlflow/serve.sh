#!/bin/sh
# Start the MLflow tracking server of a radfed coordinator (the image's entrypoint).
#
# Backend: PostgreSQL through psycopg2 (SQLAlchemy 2.1 would pick psycopg 3), the password
# read from MLFLOW_DB_PASSWORD_FILE (a compose secret) and passed in the environment, not
# on the command line. Artifacts: proxied by the server (--serve-artifacts) from
# MLFLOW_ARTIFACTS_DIR (/mlartifacts). TLS: MLFLOW_TLS_CERT / MLFLOW_TLS_KEY, a certificate
# of the study CA naming the host clients use ("mlflow").
set -eu

password=$(python -c 'import sys, urllib.parse; print(urllib.parse.quote(open(sys.argv[1]).read().strip(), safe=""))' "${MLFLOW_DB_PASSWORD_FILE:?set MLFLOW_DB_PASSWORD_FILE}")
MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://${MLFLOW_DB_USER:-mlflow}:${password}@${MLFLOW_DB_HOST:-postgres}:${MLFLOW_DB_PORT:-5432}/${MLFLOW_DB_NAME:-mlflow}"
export MLFLOW_BACKEND_STORE_URI

exec mlflow server \
    --host 0.0.0.0 --port 5000 \
    --artifacts-destination "${MLFLOW_ARTIFACTS_DIR:-/mlartifacts}" --serve-artifacts \
    --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-mlflow,mlflow:5000,localhost,localhost:5000,127.0.0.1,127.0.0.1:5000}" \
    --uvicorn-opts "--ssl-certfile ${MLFLOW_TLS_CERT:?set MLFLOW_TLS_CERT} --ssl-keyfile ${MLFLOW_TLS_KEY:?set MLFLOW_TLS_KEY}"
