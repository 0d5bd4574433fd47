#!/usr/bin/env bash
# A local MLflow tracking server for the local cluster: SQLite store and artifacts under STATE_DIR,
# bound to 127.0.0.1, in the background (stop.sh stops it).
#   cluster/local/mlflow.sh [STATE_DIR] [PORT]      -> prints the tracking URI
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="$(mkdir -p "${1:-.local-cluster}" && cd "${1:-.local-cluster}" && pwd)"
port="${2:-5001}"
mlflow="$(command -v mlflow || echo "$here/../../.venv/bin/mlflow")"
mkdir -p "$state/mlartifacts"
setsid "$mlflow" server --backend-store-uri "sqlite:///$state/mlflow.db" --artifacts-destination "$state/mlartifacts" \
  --host 127.0.0.1 --port "$port" --workers 1 > "$state/mlflow.log" 2>&1 &
echo $! > "$state/mlflow.pid"
for _ in $(seq 1 240); do  # a busy machine can take a minute or two to start it
  if "$(dirname "$mlflow")/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2> /dev/null; then
    echo "http://127.0.0.1:$port"
    exit 0
  fi
  sleep 0.5
done
echo "error: the MLflow server did not answer on 127.0.0.1:$port within 120 s (see $state/mlflow.log)" >&2
exit 1
