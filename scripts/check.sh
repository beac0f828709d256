#!/usr/bin/env bash
# The project's static checks, as CI runs them: the linter, the formatter (nothing to change) and the type
# checker, all configured in pyproject.toml. A few seconds each, mypy ~1 min on a cold cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${VENV:-.venv}/bin"
"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/mypy"
