#!/usr/bin/env bash
# The main job as a user runs it, on embedded defaults, on this machine:
#   1. set up (venv, deps, offline GPT-2 tokenizer)
#   2. a local Prefect server (SQLite in .prefect/), unless one answers already; it keeps running, UI included
#   3. the demo's offline evaluation task (HellaSwag format, from held-out demo text)
#   4. the deployments served from this checkout (python -m flows.serve: local executor, ./store), and the run
#      started with the user's own command, prefect deployment run pretrain-gpt2/demo, and its story followed
#      with python -m flows.follow RUN_ID (demo corpus -> shards -> training -> every checkpoint evaluated)
#   5. what the run achieved: val loss against the corpus's unigram entropy, the evaluations, samples
# DEMO_STEPS=N runs N steps instead of the preset's (a run of its own, store/runs/demo-N).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${VENV:-.venv}/bin/python"
PREFECT="$(dirname "$PY")/prefect"
PORT="${PREFECT_PORT:-4200}"
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:$PORT/api}"
export PREFECT_RUNNER_POLL_FREQUENCY=1  # the served deployment picks its run up within a second
mkdir -p "$PREFECT_HOME"
healthy() { "$PY" -c "import urllib.request,sys; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)" 2>/dev/null; }
if ! healthy; then
    echo "[demo] starting a local Prefect server (log: $PREFECT_HOME/server.log)"
    nohup "$PREFECT" server start --host 127.0.0.1 --port "$PORT" > "$PREFECT_HOME/server.log" 2>&1 &
    echo $! > "$PREFECT_HOME/server.pid"
    for _ in $(seq 120); do healthy && break; sleep 1; done
    healthy || { echo "[demo] the Prefect server did not come up; see $PREFECT_HOME/server.log" >&2; exit 1; }
fi
echo "[demo] Prefect UI: ${PREFECT_API_URL%/api}"

"$PY" -m evaluation.demo_task --store store > /dev/null

# Serve the deployments until the run is over (stopped with SIGTERM, the way Prefect expects).
"$PY" -m flows.serve --store store > "$PREFECT_HOME/serve.log" 2>&1 &
serve_pid=$!
trap 'kill -TERM $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    "$PREFECT" deployment inspect pretrain-gpt2/demo > /dev/null 2>&1 && break
    kill -0 $serve_pid 2>/dev/null || { echo "[demo] flows.serve stopped; see $PREFECT_HOME/serve.log" >&2; exit 1; }
    sleep 1
done
params=$("$PY" -m flows.serve --store store --print-demo-params "${DEMO_STEPS:-0}")
run_dir=store/runs/$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["params"]["run_name"])' "$params")

echo "[demo] prefect deployment run pretrain-gpt2/demo"
created=$("$PREFECT" deployment run pretrain-gpt2/demo --params "$params")
echo "$created"
run_id=$(sed -n 's/.*UUID: *\([0-9a-f-]\{36\}\).*/\1/p' <<< "$created" | head -n 1)
echo "[demo] python -m flows.follow $run_id"
"$PY" -m flows.follow "$run_id" --timeout 1800

echo
"$PY" -m evaluation.summary "$run_dir"
echo "[demo] curves: $run_dir/curves.png; the run, its task runs and artifacts: ${PREFECT_API_URL%/api}"
if [ -f "$PREFECT_HOME/server.pid" ]; then
    echo "[demo] stop the Prefect server with: kill \$(cat $PREFECT_HOME/server.pid)"
fi
