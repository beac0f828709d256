#!/usr/bin/env bash
# Runs the whole test suite (set-up included). Extra arguments go to pytest, e.g. `-k hf -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
