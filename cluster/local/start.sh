#!/usr/bin/env bash
# A local multi-node Ray cluster on this machine: a head and two worker nodes, each its own raylet
# with its own resources (head: the sweep_driver resource and no trial CPUs; workers: CPUs and a
# node_a / node_b marker), token authentication on, dashboard on 127.0.0.1 only.
#
#   cluster/local/start.sh [STATE_DIR]      (default .local-cluster)
#   export RAY_ADDRESS=http://127.0.0.1:$(cat STATE_DIR/dashboard_port) RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=STATE_DIR/token
#   ray job submit --working-dir . --entrypoint-resources '{"sweep_driver": 1}' -- clockdistill sweep SPEC
#   cluster/local/stop.sh [STATE_DIR]
#
# Environment: WORKER_CPUS (per worker, default 1), HEAD_PORT, DASHBOARD_PORT (default: free ports).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="$(mkdir -p "${1:-.local-cluster}" && cd "${1:-.local-cluster}" && pwd)"
bin="$(dirname "$(command -v ray || echo "$here/../../.venv/bin/ray")")"
ray="$bin/ray"
[ -x "$ray" ] || { echo "error: ray CLI not found (make venv, or activate .venv)" >&2; exit 2; }
# shared with start-node.sh: free_port, start_worker
# shellcheck source=cluster/local/node.sh
. "$here/node.sh"
failed() {  # the node's log tail goes to stderr: a CI run's state dir is gone by the time anyone looks
  echo "error: ray start of $1 failed (log: $state/$1.log); its last lines:" >&2
  tail -n 25 "$state/$1.log" >&2
  exit 1
}

umask 077
if [ ! -s "$state/token" ]; then  # one token per cluster, readable by this user only
  "$bin/python" -c 'import secrets; print(secrets.token_hex(32))' > "$state/token"
fi
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$state/token"
unset RAY_ADDRESS RAY_AUTH_TOKEN

head_port="${HEAD_PORT:-$(free_port)}"
dash_port="${DASHBOARD_PORT:-$(free_port)}"
echo "$head_port" > "$state/head_port"
echo "$dash_port" > "$state/dashboard_port"

# Every process of this cluster inherits this marker: stop.sh stops exactly those (found through
# /proc/PID/environ), never another Ray on this machine. Each node has a temp dir of its own, the head too.
export CLOCKDISTILL_LOCAL_CLUSTER="$state"
head_temp="$(mktemp -d "/tmp/cdray-head-XXXXXX")"
echo "$head_temp" > "$state/temp_dirs"
# Free ports for the head's agents too: Ray's defaults (52365 for the dashboard agent, which job
# submission needs) may be held by another Ray on this machine (any local `ray.init` takes it).
"$ray" start --head --node-ip-address 127.0.0.1 --port "$head_port" --num-cpus 0 --num-gpus 0 \
  --temp-dir "$head_temp" --dashboard-agent-listen-port "$(free_port)" --dashboard-agent-grpc-port "$(free_port)" \
  --runtime-env-agent-port "$(free_port)" --metrics-export-port "$(free_port)" \
  --resources '{"sweep_driver": 2}' --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" \
  --disable-usage-stats > "$state/head.log" 2>&1 || failed head

# The workers start one after the other (side by side saved about 3 s, and one such start failed in
# CI). A failed start is tried once more with fresh ports and a fresh temp dir: a free port picked
# here can be taken by another process before the node binds it.
for name in node_a node_b; do
  start_worker "$name" && continue
  echo "warning: ray start of $name failed; trying once more. Its log's last lines:" >&2
  tail -n 15 "$state/$name.log" >&2
  pkill -KILL -f -- "$temp" 2> /dev/null || true  # whatever of that node did start
  start_worker "$name" || failed "$name"
done

# wait until the head sees all three nodes alive (a worker registers a moment after `ray start` returns)
"$bin/python" - "$head_port" <<'PY' || { echo "error: the local cluster did not come up with 3 nodes (logs in $state)" >&2; exit 1; }
import sys, time, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR")
deadline = time.monotonic() + 60
while sum(n["Alive"] for n in ray.nodes()) < 3:
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.5)
PY
echo "local Ray cluster up: head + node_a + node_b (token auth on)"
echo "  export RAY_ADDRESS=http://127.0.0.1:$dash_port RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$state/token"
