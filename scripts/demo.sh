#!/usr/bin/env bash
# The main job on embedded defaults, on this machine: local store (./store), tiny preset, CPU.
#   1. set up (venv, deps, offline GPT-2 tokenizer)
#   2. prepare token shards (offline demo corpus: Python's stdlib docstrings)
#   3. train the tiny preset (resumes if run again; extra args go to training.train, e.g. --set max_steps=300)
#   4. sample from the trained checkpoint and plot the loss curves
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${VENV:-.venv}/bin/python"
"$PY" -m data_prep.demo_corpus --out store/data/demo
"$PY" -m training.train --config tiny "$@"
"$PY" -m training.sample --checkpoint store/runs/tiny --prompt "The module" --num-samples 2 --max-new-tokens 24
"$PY" -m training.plots store/runs/tiny   # loss curves: store/runs/tiny/curves.png
