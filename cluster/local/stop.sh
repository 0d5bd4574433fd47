#!/usr/bin/env bash
# Stop the local cluster of start.sh (every Ray process of this user on this machine) and the local
# MLflow server of mlflow.sh when it runs.
set -uo pipefail
state="${1:-.local-cluster}"
here="$(cd "$(dirname "$0")" && pwd)"
ray="$(command -v ray || echo "$here/../../.venv/bin/ray")"
"$ray" stop --force > /dev/null 2>&1 || true
if [ -s "$state/temp_dirs" ]; then  # the worker nodes' own temp dirs (start.sh)
  while read -r dir; do case "$dir" in /tmp/cdray-*) rm -rf "$dir" ;; esac; done < "$state/temp_dirs"
  rm -f "$state/temp_dirs"
fi
if [ -s "$state/mlflow.pid" ]; then
  pid="$(cat "$state/mlflow.pid")"  # the leader of the server's own process group (setsid in mlflow.sh)
  kill -- "-$pid" 2> /dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2> /dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2> /dev/null || true
  rm -f "$state/mlflow.pid"
fi
echo "local cluster stopped"
