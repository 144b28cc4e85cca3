#!/usr/bin/env bash
# Builds (first use) or reuses (later) the project's virtual environment in .venv,
# then runs the given command inside it.  Usage:  bash tools/env.sh CMD [ARGS...]
#   EAPM_VENV     where the environment lives (default: <repo>/.venv)
#   EAPM_PYTHON   the Python 3.10 interpreter to build it from (default: pyenv's 3.10.x)
#   EAPM_INSTALLER  uv (default: faster; falls back to pip if uv fails) or pip
# Versions: requirements.txt, resolved exactly as in constraints.txt.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EAPM_VENV:-$repo/.venv}
stamp="$venv/.eapm-env-stamp"
want=$(cat "$repo/requirements.txt" "$repo/constraints.txt" "$repo/setup.cfg" | sha1sum | cut -d' ' -f1)

find_python() {
  if [ -n "${EAPM_PYTHON:-}" ]; then echo "$EAPM_PYTHON"; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.10\.[0-9]+$' | sort -V | tail -n1 || true)
    if [ -n "$v" ]; then PYENV_VERSION=$v pyenv which python; return; fi
  fi
  # pyenv's installs even when pyenv itself is not on PATH
  for p in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10.*/bin/python 2>/dev/null | sort -V | tail -n1); do
    if [ -x "$p" ]; then echo "$p"; return; fi
  done
  for p in python3.10 python3; do
    if command -v $p >/dev/null 2>&1 && $p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))'; then
      command -v $p; return
    fi
  done
  echo "error: Python 3.10 not found (sal-detectron2 ships a CPython 3.10 build only)." >&2
  echo "       Install it (e.g. 'pyenv install 3.10.13') or set EAPM_PYTHON." >&2
  exit 1
}

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  start=$(date +%s)
  py=$(find_python)
  echo "[env] building $venv from $py (first use; a minute or a few)" >&2
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  pipq() {  # quiet pip that still fails loudly (drops the machine's noisy find-links warnings)
    local log rc=0
    log=$(mktemp)
    "$venv/bin/python" -m pip install --quiet "$@" >"$log" 2>&1 || rc=$?
    grep -v "is ignored: it is neither" "$log" >&2 || true
    rm -f "$log"
    if [ $rc -ne 0 ]; then echo "[env] 'pip install $*' failed (exit $rc)" >&2; exit $rc; fi
  }
  pipq --upgrade "pip<25" "setuptools>=64,<75" wheel
  installer=${EAPM_INSTALLER:-uv}
  if [ "$installer" = uv ] && ! "$venv/bin/python" -m pip install --quiet "uv==0.13.9" >/dev/null 2>&1; then
    echo "[env] uv could not be installed from the package index: installing with pip" >&2
    installer=pip
  fi
  cons=(-c "$repo/constraints.txt")
  if [ "$installer" = uv ]; then
    # uv downloads and unpacks in parallel (torch's CUDA wheel and its libraries, ~2.5 GB):
    # measured 31 s against pip's ~150 s for the same resolved set. It reads PyPI (or
    # UV_INDEX_URL), not pip's configuration; EAPM_INSTALLER=pip uses pip throughout.
    if ! "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" -r "$repo/requirements.txt" "${cons[@]}"; then
      echo "[env] 'uv pip install' failed: retrying with pip" >&2
      installer=pip
    fi
  fi
  if [ "$installer" = pip ]; then
    pipq -r "$repo/requirements.txt" "${cons[@]}"
  fi
  pipq --no-deps --no-build-isolation -e "$repo"
  "$venv/bin/python" -c "import torch, detectron2, detectron2._C, eapm; print('[env] torch', torch.__version__, 'detectron2', detectron2.__version__)" >&2
  echo "$want" > "$stamp"
  echo "[env] built in $(( $(date +%s) - start )) s ($installer)" >&2
fi
export PATH="$venv/bin:$PATH"
exec "$@"
