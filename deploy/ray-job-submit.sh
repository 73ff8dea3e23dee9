#!/usr/bin/env bash
# Submit the labeling job to an existing Ray cluster (Ray 2.60, Python 3.11) with `ray job submit`.
#
#   RAY_ADDRESS=http://HEAD:8265 deploy/ray-job-submit.sh s3://audio/calls s3://audio/labels [ser label options]
#
# The job runs `python -m jobs.label INPUT --output OUTPUT` on the cluster with deploy/runtime_env.yaml (this
# checkout as the working dir, the dependencies installed by pip on the nodes). S3 credentials come from the
# nodes' own AWS environment (instance role, IRSA, ...), never from this script. Extra arguments go to
# `ser label`, e.g. --set inference.max_actors=8. Set RUNTIME_ENV to another file to change the environment.
set -euo pipefail

usage="usage: RAY_ADDRESS=http://HEAD:8265 $0 INPUT OUTPUT [ser label options]"
input=${1:?$usage}
output=${2:?$usage}
shift 2
: "${RAY_ADDRESS:?$usage}"
cd "$(dirname "$0")/.."

exec ray job submit \
  --address "$RAY_ADDRESS" \
  --submission-id "ser-label-$(date -u +%Y%m%dT%H%M%SZ)" \
  --runtime-env "${RUNTIME_ENV:-deploy/runtime_env.yaml}" \
  -- python -m jobs.label "$input" --output "$output" --no-progress "$@"
