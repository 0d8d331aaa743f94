#!/usr/bin/env bash
# The main job on a fresh machine, end to end, with no GPU:
#   install the project, start two local vLLM stand-ins, write an env.yaml with a comma-separated
#   policy_base_url, ng_run the weather graph (vllm_model + simple_weather), collect 200 rollouts
#   at +concurrency=50, print the summary, stop everything it started.
# Works in .demo/ (gitignored); leaves results in .demo/results/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/ng_run" ]; then
  echo "== installing into $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e "$ROOT" 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
BIN="$VENV/bin"

WORK="$ROOT/.demo"
rm -rf "$WORK" && mkdir -p "$WORK"
cd "$WORK"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

wait_for_file() { for _ in $(seq 1 300); do [ -s "$1" ] && return 0; sleep 0.1; done; echo "timed out waiting for $1" >&2; exit 1; }

echo "== starting two local vLLM stand-ins"
for i in 1 2; do
  "$BIN/ng_vllm_standin" --port 0 --port-file "standin$i.port" --latency-ms 5 --per-token-ms 0.2 > "standin$i.log" 2>&1 &
  PIDS+=($!)
done
wait_for_file standin1.port; wait_for_file standin2.port
P1=$(cat standin1.port); P2=$(cat standin2.port)

cat > env.yaml <<YAML
policy_base_url: http://127.0.0.1:$P1/v1,http://127.0.0.1:$P2/v1
policy_api_key: EMPTY
policy_model_name: standin-model
YAML
echo "== env.yaml:"; cat env.yaml

HEAD_PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "== ng_run (head server on port $HEAD_PORT)"
"$BIN/ng_run" "+config_paths=[responses_api_models/vllm_model/configs/vllm_model.yaml,resources_servers/simple_weather/configs/simple_weather.yaml]" \
  +head_server.port="$HEAD_PORT" > ng_run.log 2>&1 &
PIDS+=($!)
for _ in $(seq 1 600); do grep -q "servers ready" ng_run.log && break; sleep 0.1; done
grep -q "servers ready" ng_run.log || { echo "ng_run did not start:"; cat ng_run.log; exit 1; }
cat ng_run.log

echo "== ng_collect_rollouts: 200 rollouts at +concurrency=50"
"$BIN/ng_collect_rollouts" +agent_name=simple_weather_simple_agent \
  +input_jsonl_fpath=resources_servers/simple_weather/data/example.jsonl \
  +output_jsonl_fpath=results/vllm_rollouts.jsonl +num_repeats=40 +limit=5 +concurrency=50 \
  +head_server.port="$HEAD_PORT"
echo "== $(wc -l < results/vllm_rollouts.jsonl) rollouts in $WORK/results/vllm_rollouts.jsonl"
