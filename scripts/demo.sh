#!/usr/bin/env bash
# The main job on embedded defaults, on this machine: a local Prefect server (SQLite in .prefect/), the local
# filesystem as store (./store), the local executor instead of Slurm, the tiny preset on CPU.
#   1. set up (venv, deps, offline GPT-2 tokenizer)
#   2. start the local Prefect server unless one answers already (it keeps running so the UI stays up)
#   3. run the pretrain-gpt2 flow: offline demo corpus -> shards -> training (resubmitted on failure) -> report
#   4. sample from the trained checkpoint
# Extra arguments go to the flow, e.g. --set max_steps=300 --run-name longer
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${VENV:-.venv}/bin/python"
PORT="${PREFECT_PORT:-4200}"
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:$PORT/api}"
mkdir -p "$PREFECT_HOME"
healthy() { "$PY" -c "import urllib.request,sys; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)" 2>/dev/null; }
if ! healthy; then
    echo "[demo] starting a local Prefect server (log: $PREFECT_HOME/server.log)"
    nohup "$PY" -m prefect server start --host 127.0.0.1 --port "$PORT" > "$PREFECT_HOME/server.log" 2>&1 &
    echo $! > "$PREFECT_HOME/server.pid"
    for _ in $(seq 120); do healthy && break; sleep 1; done
    healthy || { echo "[demo] the Prefect server did not come up; see $PREFECT_HOME/server.log" >&2; exit 1; }
fi
echo "[demo] Prefect UI: ${PREFECT_API_URL%/api}"
"$PY" -m flows.pretrain --preset tiny --store store --run-name tiny-demo --eval-tasks "" "$@"
"$PY" -m training.sample --checkpoint store/runs/tiny-demo --prompt "The module" --num-samples 2 --max-new-tokens 24
echo "[demo] curves: store/runs/tiny-demo/curves.png; UI: ${PREFECT_API_URL%/api}"
if [ -f "$PREFECT_HOME/server.pid" ]; then
    echo "[demo] stop the Prefect server with: kill \$(cat $PREFECT_HOME/server.pid)"
fi
