#!/usr/bin/env bash
# Stop the local cluster of start.sh (its own processes: any other Ray on this machine keeps running)
# and the local MLflow server of mlflow.sh when it runs.
set -uo pipefail
state="${1:-.local-cluster}"
here="$(cd "$(dirname "$0")" && pwd)"
ray="$(command -v ray || echo "$here/../../.venv/bin/ray")"
state="$(cd "$state" 2> /dev/null && pwd || echo "$state")"
cluster_pids() {  # start.sh's processes carry its marker; Ray's agents and workers name their raylet instead
  # one grep over every process's environment (a loop of one grep per process took seconds a pass
  # with a cluster's few hundred processes, and the wait below makes up to 20 passes)
  local marked
  marked=" $(grep -lzxF "CLOCKDISTILL_LOCAL_CLUSTER=$state" /proc/[0-9]*/environ 2> /dev/null \
    | sed -n 's#^/proc/\([0-9]*\)/environ$#\1#p' | grep -vx "$$" | tr '\n' ' ')"
  for pid in $marked; do echo "$pid"; done
  grep -zH '^RAY_RAYLET_PID=' /proc/[0-9]*/environ 2> /dev/null | tr '\0' '\n' \
    | sed -n 's#^/proc/\([0-9]*\)/environ:RAY_RAYLET_PID=\([0-9]*\)$#\1 \2#p' \
    | while read -r pid raylet; do
      [[ "$marked" == *" $raylet "* ]] && [[ "$marked" != *" $pid "* ]] && echo "$pid"
    done
}
if [ -s "$state/temp_dirs" ]; then
  pids="$(cluster_pids)"
  [ -n "$pids" ] && kill -TERM $pids 2> /dev/null
  for _ in $(seq 1 20); do
    pids="$(cluster_pids)"
    [ -z "$pids" ] && break
    sleep 0.5
  done
  [ -n "$pids" ] && kill -KILL $pids 2> /dev/null
  while read -r dir; do case "$dir" in /tmp/cdray-*) rm -rf "$dir" ;; esac; done < "$state/temp_dirs"
  rm -f "$state/temp_dirs"
elif [ -s "$state/head_port" ]; then  # a cluster of an older start.sh: its processes carry no marker
  "$ray" stop --force > /dev/null 2>&1 || true
fi
if [ -s "$state/mlflow.pid" ]; then
  pid="$(cat "$state/mlflow.pid")"  # the leader of the server's own process group (setsid in mlflow.sh)
  kill -- "-$pid" 2> /dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2> /dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2> /dev/null || true
  rm -f "$state/mlflow.pid"
fi
echo "local cluster stopped"
