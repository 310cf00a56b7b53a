#!/usr/bin/env bash
# Start (or resume) one study on a running Ray cluster; run on the head node or as a
# Ray job's entrypoint. Extra arguments go to `study run` (--space, --trials, --set, …).
#
#   STUDY_NAME            the study (required): a retried job resumes it (--resume)
#   STUDY_STORAGE         s3://bucket/prefix or a shared mount (required)
#   MLFLOW_TRACKING_URI   the MLflow server (required), e.g. http://mlflow:5000
#   MIN_NODES             wait until this many Ray nodes are alive (default 1)
#   CLUSTER_WAIT_S        how long to wait for them, seconds (default 600)
#   DOCTOR_TIMEOUT_S      seconds each node has to pass `study doctor` (default 120)
# Credentials come from the environment only (MLFLOW_TRACKING_USERNAME/PASSWORD,
# AWS_*, PGPASSWORD, RAY_AUTH_TOKEN), never from arguments.
set -euo pipefail

: "${STUDY_NAME:?set STUDY_NAME}"
: "${STUDY_STORAGE:?set STUDY_STORAGE (s3://bucket/prefix or a shared mount)}"
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI}"

MIN_NODES="${MIN_NODES:-1}" CLUSTER_WAIT_S="${CLUSTER_WAIT_S:-600}" python - <<'PY'
import os, sys, time

import ray

want, wait_s = int(os.environ["MIN_NODES"]), float(os.environ["CLUSTER_WAIT_S"])
ray.init(address="auto", log_to_driver=False, configure_logging=False)
deadline = time.monotonic() + wait_s
while (alive := sum(n["Alive"] for n in ray.nodes())) < want:
    if time.monotonic() > deadline:
        sys.exit(f"only {alive} of {want} Ray nodes joined within {wait_s:g} s")
    time.sleep(5)
print(f"{alive} Ray node(s) alive", flush=True)
PY

study doctor --address auto --storage "$STUDY_STORAGE" --tracking-uri "$MLFLOW_TRACKING_URI" --timeout "${DOCTOR_TIMEOUT_S:-120}"

exec study run --name "$STUDY_NAME" --resume --address auto --storage "$STUDY_STORAGE" --tracking-uri "$MLFLOW_TRACKING_URI" "$@"
