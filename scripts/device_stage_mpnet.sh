#!/usr/bin/env bash
# One short device-tool call per stage: moves the carried .carry/mpnet-K (scripts/prepare_carry_mpnet.py) into
# build/mpnet-staged/, which stays on the lent machine while it is warm (the device tool keeps ignored outputs
# between calls; it releases an idle machine after ~30 s, so make the calls back to back). The MPNet weights
# (219 MB in FP16) do not fit one call's 64 MiB: stages 1..4, then the training call
# (TEACHERS=mpnet bash scripts/device_train_v2.sh "$OUT"), which joins and checks them.
# Usage on the device machine:  bash scripts/device_stage_mpnet.sh K
set -euo pipefail
stage=${1:?stage number}
mkdir -p build/mpnet-staged
cp .carry/mpnet-"$stage"/* build/mpnet-staged/
ls -l build/mpnet-staged
