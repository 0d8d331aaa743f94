#!/usr/bin/env bash
# Install NeMo Gym (nemo-gym 0.4.0 from PyPI) into its own venv on Python 3.12, for the tests and
# the bench that run NeMo Gym's own environments inside our graph (+nemo_gym.python=<venv>/bin/python).
#
# Usage: scripts/nemo_gym/install.sh [VENV_DIR]
#   VENV_DIR        default <repo>/.nemo_gym/venv (also: env NEMO_GYM_VENV)
#   NEMO_GYM_PY     interpreter, default python3.12 on PATH, else ~/.pyenv/versions/3.12.*/bin/python
#   NEMO_GYM_SPEC   pip spec, default nemo-gym==0.4.0 (0.5 and later need Python >= 3.13.14)
#   FORCE=1         reinstall even when the marker says it is done
#
# Idempotent: a marker in the venv makes a re-run a no-op (< 1 s); a lock next to the venv
# serialises two sessions. The first time: ~1.4 GB, ~3 min of CPU (60-90 s on an idle 2-core machine,
# 580 s measured while tests ran beside it). Exit code 3: no Python 3.12.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${1:-${NEMO_GYM_VENV:-$REPO/.nemo_gym/venv}}"
SPEC="${NEMO_GYM_SPEC:-nemo-gym==0.4.0}"
MARKER="$VENV/.nemo_gym_installed"   # holds $SPEC

pip_q() { "$VENV/bin/pip" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
die() { echo "nemo_gym/install.sh: ERROR: $*" >&2; exit "${2:-1}"; }
say() { echo "nemo_gym/install.sh: $*"; }
venv_ok() { [[ -x "$VENV/bin/python" && -f "$MARKER" && "$(cat "$MARKER")" == "$SPEC" ]]; }
# A venv made another way (e.g. a shared cache) that already has this version: adopt it.
has_spec() { [[ -x "$VENV/bin/python" && "$("$VENV/bin/python" -c "import importlib.metadata as m; print('nemo-gym==' + m.version('nemo-gym'))" 2>/dev/null)" == "$SPEC" ]]; }

mkdir -p "$(dirname "$VENV")"
exec 9>"$(dirname "$VENV")/.nemo_gym_install.lock"
flock 9

if [[ "${FORCE:-0}" != "1" ]] && venv_ok; then
  say "already installed ($SPEC in $VENV)"
  exit 0
fi
if [[ "${FORCE:-0}" != "1" ]] && has_spec; then
  echo "$SPEC" > "$MARKER"
  say "found $SPEC in $VENV; using it"
  exit 0
fi

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
PY=""
if [[ -n "${NEMO_GYM_PY:-}" ]]; then
  is_312 "$NEMO_GYM_PY" || die "NEMO_GYM_PY=$NEMO_GYM_PY is not a working Python 3.12 (nemo-gym 0.4.0 needs 3.12)" 3
  PY="$NEMO_GYM_PY"
else  # python3.12 on PATH (a pyenv shim may not work), else pyenv's newest 3.12
  for cand in "$(command -v python3.12 || true)" $(ls -d "$HOME"/.pyenv/versions/3.12.*/bin/python 2>/dev/null | sort -rV); do
    if [[ -n "$cand" ]] && is_312 "$cand"; then PY="$cand"; break; fi
  done
fi
[[ -n "$PY" ]] || die "no working Python 3.12 found (nemo-gym 0.4.0 needs Python 3.12; set NEMO_GYM_PY)" 3

t0=$(date +%s)
rm -f "$MARKER"
say "creating $VENV with $("$PY" -V 2>&1) and installing $SPEC (1-2 min)"
"$PY" -m venv "$VENV" || die "could not create a venv at $VENV"
pip_q install -q -U pip || die "pip could not upgrade itself: no network to PyPI?"
pip_q install -q "$SPEC" || die "pip could not install $SPEC (needs PyPI)"
# -P: the cwd is not on sys.path (run from our repo, our own resources_servers/ would shadow NeMo's)
"$VENV/bin/python" -P -c "import nemo_gym, resources_servers.mcqa" || die "the venv at $VENV cannot import nemo_gym"
echo "$SPEC" > "$MARKER"
say "done in $(( $(date +%s) - t0 )) s: $(du -sh "$VENV" | cut -f1) in $VENV"
