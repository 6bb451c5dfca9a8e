#!/usr/bin/env bash
# One short device-tool call per stage: moves the carried .carry/mpnet-K (scripts/prepare_carry_mpnet.py) into
# $MPNET_STAGED (default /tmp/mpnet-staged), outside the repository copy: the device tool re-syncs that copy on
# every call (a sparse tree without .gitignore lost an in-repo build/ folder between calls), while /tmp stays
# on the lent machine as long as it is warm (released after ~30 s idle: make the calls back to back). The MPNet weights
# (219 MB in FP16) do not fit one call's 64 MiB: stages 1..4, then the training call
# (TEACHERS=mpnet bash scripts/device_train_v2.sh "$OUT"), which joins and checks them.
# Usage on the device machine:  bash scripts/device_stage_mpnet.sh K
set -euo pipefail
stage=${1:?stage number}
staged=${MPNET_STAGED:-/tmp/mpnet-staged}
mkdir -p "$staged"
cp .carry/mpnet-"$stage"/* "$staged"/
ls -l "$staged"
