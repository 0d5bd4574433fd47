# Sourced by start.sh and start-node.sh (needs $bin, $ray, $state and $head_port set, and the cluster's
# marker and token in the environment).
free_port() { "$bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_worker() {  # start_worker NAME: one worker node; its log in $state/NAME.log
  # Every node on one machine needs its own agent and metrics ports, and its own temp dir: in a
  # shared one, a node unpacking a job's working_dir replaces the very directory another node's
  # processes (the job driver's cwd) run in. Short paths: Unix sockets live there.
  temp="$(mktemp -d "/tmp/cdray-$1-XXXXXX")"
  echo "$temp" >> "$state/temp_dirs"
  "$ray" start --address "127.0.0.1:$head_port" --node-ip-address 127.0.0.1 --num-cpus "${WORKER_CPUS:-1}" --num-gpus 0 \
    --temp-dir "$temp" \
    --resources "{\"$1\": 1}" --dashboard-agent-listen-port "$(free_port)" --dashboard-agent-grpc-port "$(free_port)" \
    --runtime-env-agent-port "$(free_port)" --metrics-export-port "$(free_port)" \
    --disable-usage-stats >> "$state/$1.log" 2>&1
}
