#!/usr/bin/env bash
# Start one worker node of the local cluster again (after kill-node.sh, as a machine comes back):
# the same name and resources, fresh ports and temp dir, joined to the running head.
#   cluster/local/start-node.sh node_a|node_b [STATE_DIR]   (default .local-cluster)
set -euo pipefail
name="${1:?usage: start-node.sh node_a|node_b [STATE_DIR]}"
here="$(cd "$(dirname "$0")" && pwd)"
state="$(cd "${2:-.local-cluster}" 2> /dev/null && pwd)" || { echo "error: no local cluster state in ${2:-.local-cluster}" >&2; exit 2; }
bin="$(dirname "$(command -v ray || echo "$here/../../.venv/bin/ray")")"
ray="$bin/ray"
[ -s "$state/head_port" ] || { echo "error: $state has no head_port: start the cluster with start.sh first" >&2; exit 2; }
head_port="$(cat "$state/head_port")"
# shellcheck source=cluster/local/node.sh
. "$here/node.sh"
export CLOCKDISTILL_LOCAL_CLUSTER="$state" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$state/token"
unset RAY_ADDRESS RAY_AUTH_TOKEN
umask 077
start_worker "$name" || { echo "error: ray start of $name failed; its log's last lines:" >&2; tail -n 15 "$state/$name.log" >&2; exit 1; }
echo "node $name started again"
