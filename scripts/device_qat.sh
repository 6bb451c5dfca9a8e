#!/usr/bin/env bash
# One device-tool call (one GPU): quantization-aware fine-tuning of a trained minilm-sentiment checkpoint
# (stream_sentiment.modeling.qat via train_v2 --quantization-aware), several variants side by side on the one GPU.
#
# Expects the carried, git-ignored .carry/qat (scripts/prepare_carry_qat.py): start/ (the checkpoint, FP16, with
# the base's config and tokenizer), corpora/, soft/ (the teacher's soft labels of the K = 5 transfer set).
# QAT_VARIANTS: "name:extra train_v2 arguments" entries separated by ";" (default below). Every variant starts
# from start/, trains through ORT's int8 rounding, and keeps its best epoch by the dev score of the simulated INT8.
# scripts/select_v2.py then picks the best variant on the dev sets and sends it back as FP16 parts; assemble it
# with scripts/assemble_v2_checkpoint.py OUT v2 DEST, then `stream-sentiment calibrate` as any checkpoint.
# Usage on the device machine:  bash scripts/device_qat.sh "$OUT"
set -euo pipefail
out=${1:?output folder}
carry=${CARRY:-.carry/qat}
DEADLINE_S=${DEADLINE_S:-420}   # training stops stepping this many seconds after the start
# The default: the second call's four self-distillation variants (docs/model.md); its first call ran
# "sd1-lr1e-5:--self-distillation 1.0 --learning-rate 1e-5;teacher-lr1e-5:--learning-rate 1e-5;
#  teacher-lr3e-5:--learning-rate 3e-5;sd0.5-lr2e-5:--self-distillation 0.5 --learning-rate 2e-5".
sd="--self-distillation 1.0 --self-distillation-temperature"
QAT_VARIANTS=${QAT_VARIANTS:-"sd1-t0.25-lr2e-5:$sd 0.25 --learning-rate 2e-5;sd1-t0.5-lr2e-5:$sd 0.5 --learning-rate 2e-5;sd1-t0.25-lr1e-5:$sd 0.25 --learning-rate 1e-5;sd1-t0.1-lr2e-5:$sd 0.1 --learning-rate 2e-5"}
COMMON=${COMMON:-"--epochs 6 --epoch-rows 25600 --seed 14 --augment-copies 5 --soft-weight 0.8"}
device=${DEVICE:-cuda}
start=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=2
mkdir -p "$out"
runs=${RUNS:-/tmp/runs_qat}; rm -rf "$runs"; mkdir -p "$runs"
trap 'tar -czf "$out/logs.tar.gz" -C "$runs" $(cd "$runs" && ls *.log *.txt 2>/dev/null) || true' EXIT
if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$runs/gpu.txt"; fi
python3 -c 'import torch; print("torch", torch.__version__)' | tee -a "$runs/gpu.txt"
# train_v2's --init-checkpoint reads checkpoint*.safetensors; the carry names it as a base model (select_v2 reads that).
ln -sf model.safetensors "$carry/start/checkpoint.fp16.safetensors"
read -r -a common <<< "$COMMON"
read -r -a smoke <<< "${SMOKE_ARGS:-}"
IFS=';' read -r -a variants <<< "$QAT_VARIANTS"
pids=()
for variant in "${variants[@]}"; do
  name=${variant%%:*}
  read -r -a extra <<< "${variant#*:}"
  python3 -m stream_sentiment.modeling.train_v2 --device "$device" --output "$runs/$name" --no-progress \
    --init-checkpoint "$carry/start" --base-model "$carry/start" --corpora-dir "$carry/corpora" \
    --quantization-aware true --soft-labels "$carry/soft/soft.npy" "${common[@]}" "${extra[@]}" \
    --deadline $((start + DEADLINE_S)) "${smoke[@]}" > "$runs/$name.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "training done after $(( $(date +%s) - start )) s (status $status)" | tee -a "$runs/timeline.txt"
python3 scripts/select_v2.py "$runs" "$out" --corpora-dir "$carry/corpora" --base-model "$carry/start" \
  | tee "$runs/select.txt"
echo "call done after $(( $(date +%s) - start )) s" | tee -a "$runs/timeline.txt"
