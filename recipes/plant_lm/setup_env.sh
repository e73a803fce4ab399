#!/usr/bin/env bash
# Create a virtual environment for this recipe and install its CPU requirements.
#   bash setup_env.sh                 # -> .venv with torch 2.13.0
#   TORCH_VERSION=2.13.0 VENV_DIR=/scratch/venv TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash setup_env.sh
# torch goes in first with its pin, and every later install is constrained to it, so pip never swaps it.
set -euo pipefail
cd "$(dirname "$0")"
venv=${VENV_DIR:-.venv}
torch_version=${TORCH_VERSION:-2.13.0}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${pip[@]}" --index-url "$TORCH_INDEX_URL" "torch==$torch_version"
else
  "${pip[@]}" "torch==$torch_version"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"
# biorecipes_shared: an exported recipe's requirements.txt already lists its vendored ./shared; in the monorepo
# it is ../../shared.
if grep -q '^\./shared' requirements.txt; then
  "${pip[@]}" -c "$constraints" -r requirements.txt
elif [ -f ../../shared/pyproject.toml ]; then
  "${pip[@]}" -c "$constraints" -e ../../shared -r requirements.txt
else
  echo "error: biorecipes_shared not found (expected ./shared listed in requirements.txt, or ../../shared)" >&2
  exit 1
fi
echo "ready: source $venv/bin/activate && bash train_sample.sh"
