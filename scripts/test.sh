#!/usr/bin/env bash
# Runs the whole test suite (set-up included), after the static checks (scripts/check.sh). Extra arguments go
# to pytest alone, e.g. `-k hf -x`, or `tests/unit` for the quick tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then
    bash scripts/check.sh
fi
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
