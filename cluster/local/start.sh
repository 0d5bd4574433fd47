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
free_port() { "$bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

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

"$ray" start --head --node-ip-address 127.0.0.1 --port "$head_port" --num-cpus 0 --num-gpus 0 \
  --resources '{"sweep_driver": 2}' --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" \
  --disable-usage-stats > "$state/head.log" 2>&1

: > "$state/temp_dirs"
names=(node_a node_b)
pids=()
for name in "${names[@]}"; do
  # Every node on one machine needs its own agent and metrics ports, and its own temp dir: in a
  # shared one, a node unpacking a job's working_dir replaces the very directory another node's
  # processes (the job driver's cwd) run in. Short paths: Unix sockets live there. The two workers
  # start side by side (each `ray start` mostly waits on its own processes coming up).
  temp="$(mktemp -d "/tmp/cdray-$name-XXXXXX")"
  echo "$temp" >> "$state/temp_dirs"
  "$ray" start --address "127.0.0.1:$head_port" --node-ip-address 127.0.0.1 --num-cpus "${WORKER_CPUS:-1}" --num-gpus 0 \
    --temp-dir "$temp" \
    --resources "{\"$name\": 1}" --dashboard-agent-listen-port "$(free_port)" --dashboard-agent-grpc-port "$(free_port)" \
    --runtime-env-agent-port "$(free_port)" --metrics-export-port "$(free_port)" \
    --disable-usage-stats > "$state/$name.log" 2>&1 &
  pids+=("$!")
done
for i in "${!names[@]}"; do
  wait "${pids[$i]}" || { echo "error: ray start of ${names[$i]} failed (log: $state/${names[$i]}.log)" >&2; exit 1; }
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
