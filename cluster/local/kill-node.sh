#!/usr/bin/env bash
# Kill one worker node of the local cluster as a machine failure would: its raylet and every process
# under it (workers, agents), with SIGKILL. For trying fault tolerance by hand, and for the tests.
#   cluster/local/kill-node.sh node_a|node_b [STATE_DIR]   (default .local-cluster)
set -euo pipefail
name="${1:?usage: kill-node.sh node_a|node_b [STATE_DIR]}"
state="$(cd "${2:-.local-cluster}" 2> /dev/null && pwd || echo "${2:-.local-cluster}")"
raylet=""
for pid in $(pgrep -f -- "raylet .*--static_resource_list=$name,1" || true); do
  # this cluster's node: its processes carry start.sh's marker (other clusters may run on this machine)
  if { tr '\0' '\n' < "/proc/$pid/environ"; } 2> /dev/null | grep -qxF "CLOCKDISTILL_LOCAL_CLUSTER=$state"; then
    raylet="$pid"
    break
  fi
done
[ -n "$raylet" ] || { echo "error: no raylet of node $name of the cluster in $state is running" >&2; exit 2; }
tree() { echo "$1"; for child in $(pgrep -P "$1" || true); do tree "$child"; done; }
pids="$(tree "$raylet")"
kill -STOP $pids 2> /dev/null || true   # freeze the tree first, so nothing restarts a child in between
kill -KILL $pids 2> /dev/null || true
echo "killed node $name (raylet $raylet and $(($(echo "$pids" | wc -w) - 1)) process(es) under it)"
