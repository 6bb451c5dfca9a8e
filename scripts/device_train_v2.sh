#!/usr/bin/env bash
# One device-tool call (one GPU, ~16 cores): minilm-sentiment v2 and the fast CPU student, staged.
#
#   A. teachers on the v2 mixture's hard labels, in parallel; each saves its probabilities on the training
#      rows. TEACHERS=minilm (default): four 6-layer MiniLMs (seeds 13-16, lr 5e-5 / 3e-5); TEACHERS=mpnet: two
#      12-layer MPNets (seeds 13/14, lr 2e-5 / 3e-5; their base staged on this machine beforehand by
#      scripts/device_stage_mpnet.sh 1..4, joined and checked here); TEACHERS=both: all six.
#   B. their mean = the soft labels (scripts/ensemble_v2.py); then in parallel two 6-layer students
#      (v2 candidates) and two FAST_LAYERS-deep students (full and FAST_FFN-wide FFN) on soft + hard labels.
#      AUGMENT_COPIES=K: the teachers also score K perturbed copies of every training row (a transfer set,
#      stream_sentiment.modeling.augment) and the students learn those from the teachers alone.
#      V2_RUNS=0 leaves out the two 6-layer students, V2_RUNS=soft0.8 trains v2's recipe alone, V2_EPOCHS sets their
#      epochs (3); FAST_EPOCHS sets the fast students' epochs (4);
#      FAST_SHAPES=narrow trains the narrow-FFN one alone (minilm-fast as committed), none neither; SOFT_FROM=DIR skips stage A
#      and takes an earlier call's soft labels from DIR (stage B then has the call to itself).
#   C. scripts/select_v2.py: per group the best run on the dev sets (MiniLM teachers compete for v2 too),
#      FP16 storage check, checkpoints back as <16 MiB FP16 parts (frozen word embeddings left out: they are
#      the carried base's), OUT/train_v2_report.json, OUT/logs.tar.gz: about 6 files, ~35 MB.
#
# Selection uses dev sets only (tweet validation, held-out review sentences, NYT editorials never
# trained on); the VADER test tweets are scored for the record. Deadlines guard the call's time
# limit: a stage past its deadline stops its runs at the next step (training.json says so).
# Expects the carried, git-ignored .carry/train16 (scripts/prepare_carry_v2.py): base/ and corpora/.
# Usage on the device machine:  bash scripts/device_train_v2.sh "$OUT"
set -euo pipefail
out=${1:?output folder}
# The students' shapes were chosen by measured CPU speed (docs/model.md): 2 layers (~3x v1, engine only)
# and 2 layers with half the FFN (~4.3x).
FAST_LAYERS=${FAST_LAYERS:-2}
FAST_FFN=${FAST_FFN:-768}
carry=${CARRY:-.carry/train16}
# Teachers: minilm (four 6-layer MiniLMs, the first runs), mpnet (two 12-layer MPNets: stage the base first,
# scripts/device_stage_mpnet.sh) or both; the students learn from the mean of whichever ran.
TEACHERS=${TEACHERS:-minilm}
MPNET_EPOCHS=${MPNET_EPOCHS:-2}
MPNET_SEEDS=${MPNET_SEEDS:-13 14}   # seed 13 trains at lr 2e-5, any other seed at 3e-5 (first MPNet call: a tie)
# Perturbed copies of each training row scored by the teachers and distilled into the students
# (stream_sentiment.modeling.augment); 0 = the students see the training rows only.
AUGMENT_COPIES=${AUGMENT_COPIES:-0}
augment=(--augment-copies "$AUGMENT_COPIES")
# Which students (header): checked here, not after the teachers' minutes.
V2_RUNS=${V2_RUNS:-1}
V2_EPOCHS=${V2_EPOCHS:-3}
FAST_SHAPES=${FAST_SHAPES:-both}
case "$V2_RUNS" in 0|1|soft0.8) ;; *) echo "V2_RUNS: 0, 1 or soft0.8, not $V2_RUNS" >&2; exit 2;; esac
case "$FAST_SHAPES" in both|narrow|none) ;; *) echo "FAST_SHAPES: both, narrow or none, not $FAST_SHAPES" >&2; exit 2;; esac
if [ "$TEACHERS" = minilm ]; then a_default=230; b_default=450; else a_default=330; b_default=520; fi
STAGE_A_S=${STAGE_A_S:-$a_default}   # teachers stop stepping this many seconds after the start
STAGE_B_S=${STAGE_B_S:-$b_default}   # students likewise
# For a CPU smoke run only: DEVICE=cpu SMOKE_ARGS="--max-train-rows 64 --max-eval-rows 40 --epochs 1" (appended last).
device=${DEVICE:-cuda}
read -r -a smoke <<< "${SMOKE_ARGS:-}"
start=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=2 RAYON_NUM_THREADS=4
mkdir -p "$out"
runs=${RUNS:-/tmp/runs_v2}; rm -rf "$runs"; mkdir -p "$runs"
# At most 8 files come back: the logs, notes and soft labels travel as one archive, whatever happens.
trap 'tar -czf "$out/logs.tar.gz" -C "$runs" $(cd "$runs" && ls *.log *.txt soft*.json soft*.npy 2>/dev/null) || true' EXIT
if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$runs/gpu.txt"; fi
python3 -c 'import torch; print("torch", torch.__version__)' | tee -a "$runs/gpu.txt"
common=(--corpora-dir "$carry/corpora" --base-model "$carry/base" --device "$device" --no-progress)

launch() {  # name, then train_v2 arguments; logs to $runs/<name>.log
  local name=$1; shift
  python3 -m stream_sentiment.modeling.train_v2 "${common[@]}" --output "$runs/$name" "$@" "${smoke[@]}" \
    > "$runs/$name.log" 2>&1 &
  pids+=($!)
}
finish() {  # wait for every launched run; a failed run is reported, not fatal (selection skips it)
  for pid in "${pids[@]}"; do wait "$pid" || echo "run pid $pid failed (exit $?)" | tee -a "$runs/failures.txt"; done
  pids=()
}

pids=()
deadline=$((start + STAGE_A_S))
if [ -n "${SOFT_FROM:-}" ]; then
  # Students only: the soft labels of an earlier call (its logs.tar.gz: soft.npy, soft.json and, with a transfer
  # set, soft_augmented.npy, carried in SOFT_FROM); the students check their digest against this corpus.
  cp "$SOFT_FROM"/soft.npy "$SOFT_FROM"/soft.json "$runs"/
  if [ -f "$SOFT_FROM"/soft_augmented.npy ]; then cp "$SOFT_FROM"/soft_augmented.npy "$runs"/; fi
  echo "no teachers: soft labels from $SOFT_FROM" | tee -a "$runs/timeline.txt"
else
  if [ "$TEACHERS" != mpnet ]; then
    launch teacher-s13 --seed 13 --learning-rate 5e-5 --epochs 3 --write-train-probabilities --deadline $deadline "${augment[@]}"
    launch teacher-s14 --seed 14 --learning-rate 5e-5 --epochs 3 --write-train-probabilities --deadline $deadline "${augment[@]}"
    launch teacher-s15 --seed 15 --learning-rate 3e-5 --epochs 3 --write-train-probabilities --deadline $deadline "${augment[@]}"
    launch teacher-s16 --seed 16 --learning-rate 3e-5 --epochs 3 --write-train-probabilities --deadline $deadline "${augment[@]}"
  fi
  if [ "$TEACHERS" != minilm ]; then
    # 12-layer MPNet teachers (stream_sentiment.modeling.mpnet_teacher) from the staged base, joined and checked.
    STAGED=${MPNET_STAGED:-/tmp/mpnet-staged} python3 -c 'import os, pathlib; from stream_sentiment.modeling.mpnet_base import join_stages
print("MPNet base joined:", join_stages(pathlib.Path(os.environ["STAGED"]), pathlib.Path("build/mpnet-base")), "bytes")'
    mpnet=(--encoder mpnet --base-model build/mpnet-base --freeze-word-embeddings false --epochs "$MPNET_EPOCHS"
           --write-train-probabilities --deadline $deadline "${augment[@]}")
    for seed in $MPNET_SEEDS; do
      if [ "$seed" = 13 ]; then lr=2e-5; else lr=3e-5; fi
      launch mpnet-s"$seed" "${mpnet[@]}" --seed "$seed" --learning-rate $lr
    done
  fi
  finish
  echo "stage A done at +$(( $(date +%s) - start )) s" | tee -a "$runs/timeline.txt"
  teachers=("$runs"/teacher-s*/ "$runs"/mpnet-s*/)
  python3 scripts/ensemble_v2.py --corpora-dir "$carry/corpora" --output "$runs/soft.npy" "${teachers[@]}" | tail -1
fi

deadline=$((start + STAGE_B_S))
# V2_RUNS=0: the fast students alone (with TEACHERS=mpnet no v2 is then selected; MiniLM teachers still form one);
# V2_RUNS=soft0.8: only that one (v2's recipe), the GPU to itself. V2_EPOCHS: their epochs (3).
if [ "$V2_RUNS" = 1 ]; then
launch v2-s13-soft0.5 --seed 13 --learning-rate 5e-5 --epochs "$V2_EPOCHS" --soft-labels "$runs/soft.npy" --soft-weight 0.5 --deadline $deadline "${augment[@]}"
fi
if [ "$V2_RUNS" != 0 ]; then
launch v2-s14-soft0.8 --seed 14 --learning-rate 5e-5 --epochs "$V2_EPOCHS" --soft-labels "$runs/soft.npy" --soft-weight 0.8 --deadline $deadline "${augment[@]}"
fi
FAST_EPOCHS=${FAST_EPOCHS:-4}
# FAST_SHAPES=narrow: only the narrow-FFN student (minilm-fast's shape), the GPU to itself; none: no fast student.
if [ "$FAST_SHAPES" = both ]; then
launch fast-l$FAST_LAYERS --layers "$FAST_LAYERS" --seed 13 --learning-rate 1e-4 --epochs "$FAST_EPOCHS" \
  --soft-labels "$runs/soft.npy" --soft-weight 0.7 --deadline $deadline "${augment[@]}"
fi
if [ "$FAST_SHAPES" != none ]; then
launch fast-l$FAST_LAYERS-ffn$FAST_FFN --layers "$FAST_LAYERS" --intermediate-size "$FAST_FFN" --seed 13 \
  --learning-rate 1e-4 --epochs "$FAST_EPOCHS" --soft-labels "$runs/soft.npy" --soft-weight 0.7 --deadline $deadline "${augment[@]}"
fi
finish
echo "stage B done at +$(( $(date +%s) - start )) s" | tee -a "$runs/timeline.txt"

for f in "$runs"/*.log; do echo "== $f"; grep -v '%|' "$f" | tail -5; done
python3 scripts/select_v2.py "$runs" "$out" --corpora-dir "$carry/corpora" --base-model "$carry/base"
echo "all done at +$(( $(date +%s) - start )) s" | tee -a "$runs/timeline.txt"
