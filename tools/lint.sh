#!/usr/bin/env bash
# Formatting and lint check (as detectron2: black + isort at 100 columns, flake8), with the
# versions pinned in requirements-lint.txt, inside the project's environment (tools/env.sh).
#   bash tools/lint.sh         check only (CI)
#   bash tools/lint.sh --fix   rewrite the files with black and isort, then run flake8
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
targets=(.)  # the whole tree (configs and setup.py too); .venv, datasets and outputs excluded in setup.cfg / pyproject.toml
exec bash tools/env.sh bash -c '
  set -euo pipefail
  frozen=$(python -m pip freeze 2>/dev/null)
  missing=0
  while read -r req; do  # every pin of requirements-lint.txt installed? (black may come with detectron2)
    case "$req" in ""|\#*) continue ;; esac
    grep -qix "$req" <<<"$frozen" || missing=1
  done < requirements-lint.txt
  if [ "$missing" = 1 ]; then
    echo "[lint] installing requirements-lint.txt" >&2
    python -m pip install --quiet -r requirements-lint.txt -c constraints.txt 2>&1 | grep -v "is ignored: it is neither" >&2 || true
  fi
  if [ "${1:-}" = "--fix" ]; then
    shift
    isort --quiet "$@"
    black --quiet "$@"
  else
    isort --check-only --diff --quiet "$@"
    black --check --quiet "$@"
  fi
  flake8 "$@"
  echo "[lint] black, isort, flake8: clean"
' lint "$@" "${targets[@]}"
