#!/usr/bin/env bash
# Kill a sweep's driver as a crash would: SIGKILL of the driver process of a job submitted with
# `ray job submit` (its entrypoint, `clockdistill sweep ...`), found through the job API. Launch the
# same sweep again (a new submission id, the same spec) and it resumes. For trying fault tolerance
# by hand, and for the tests. Uses RAY_ADDRESS and the token settings that start.sh prints.
#   cluster/local/kill-driver.sh SUBMISSION_ID
set -euo pipefail
id="${1:?usage: kill-driver.sh SUBMISSION_ID}"
here="$(cd "$(dirname "$0")" && pwd)"
bin="$(dirname "$(command -v ray || echo "$here/../../.venv/bin/ray")")"
[ -n "${RAY_ADDRESS:-}" ] || { echo "error: RAY_ADDRESS is not set (export what start.sh printed)" >&2; exit 2; }
# the job's driver registers a moment after the job starts: wait up to 60 s for it
pid="$("$bin/python" - "$id" <<'PY'
import sys, time
from ray.job_submission import JobSubmissionClient

client, deadline = JobSubmissionClient(), time.monotonic() + 60
while True:
    info = client.get_job_info(sys.argv[1])
    if info.driver_info is not None:
        print(info.driver_info.pid)
        break
    if info.status.is_terminal() or time.monotonic() > deadline:
        sys.exit(f"error: job {sys.argv[1]} has no running driver (status {info.status})")
    time.sleep(0.5)
PY
)" || exit 2
kill -KILL "$pid"
echo "killed the driver of job $id (pid $pid)"
