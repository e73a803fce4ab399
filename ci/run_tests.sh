#!/usr/bin/env bash
# Run every test suite: the tooling (README commands included), shared/, each recipe in-tree followed by its exported
# copy's `smoke` tests (the standalone copy imports, trains, resumes; the in-tree run already ran everything), with
# esm2_fa's faesm tests in their own venv, and the GPU check's CPU dry run. All suites: two lanes side by side.
# Usage: [FAESM_BIN=.venv-faesm/bin] ci/run_tests.sh VENV_BIN [RECIPE]. Prints "tests: N passed, N failed, N skipped".
set -uo pipefail
bin=$(cd "$1" && pwd)  # absolute: suites run from inside their folders
only=${2:-}
cd "$(dirname "$0")/.."
root=$PWD
faesm_bin=${FAESM_BIN:-$root/.venv-faesm/bin}
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
failed_suites=()
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

run_suite_in() {  # python, name, directory, extra pytest args...
  local python=$1 name=$2 dir=$3
  shift 3
  echo "=== $name ($dir) ==="
  local start=$SECONDS
  (cd "$dir" && "$python" -m pytest -q --junitxml="$reports/$name.xml" "$@") || failed_suites+=("$name")
  echo "=== $name took $((SECONDS - start)) s ==="
}
run_suite() { run_suite_in "$bin/python" "$@"; }  # name, directory, extra pytest args...

passed_in() {  # junit file -> number of passed tests (0 when the file is missing)
  "$bin/python" - "$1" <<'PY'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

path = Path(sys.argv[1])
suites = list(ET.parse(path).getroot().iter("testsuite")) if path.is_file() else []
keys = ("tests", "failures", "errors", "skipped")
print(sum(int(s.get(keys[0], 0)) - sum(int(s.get(k, 0)) for k in keys[1:]) for s in suites))
PY
}

run_faesm_suite() {  # esm2_fa's faesm backend needs transformers <= 4.53: its tests run in .venv-faesm
  if [ ! -x "$faesm_bin/python" ]; then
    echo "=== esm2_fa-faesm: no $faesm_bin/python (make setup-faesm creates it) ==="
    failed_suites+=(esm2_fa-faesm)
    return
  fi
  run_suite_in "$faesm_bin/python" esm2_fa-faesm recipes/esm2_fa -m faesm
  # pytest already fails when nothing is collected; a job whose every test skipped would prove nothing either.
  local passed
  passed=$(passed_in "$reports/esm2_fa-faesm.xml")
  if [ "${passed:-0}" -lt 1 ]; then
    echo "esm2_fa-faesm: no faesm test passed (all skipped or none collected)"
    failed_suites+=(esm2_fa-faesm-vacuous)
  fi
}

recipes=()
for dir in recipes/*/; do
  name=$(basename "$dir")
  [ -n "$only" ] && [ "$name" != "$only" ] && continue
  [ -d "$dir/tests" ] && recipes+=("$name")
done

run_recipe() {  # name: in-tree suite (+ esm2_fa's faesm job), then the exported copy's smoke tests
  local name=$1 dest where
  run_suite "$name" "recipes/$name"
  [ "$name" = esm2_fa ] && run_faesm_suite
  dest=$(mktemp -d)/"$name"
  bash ci/export_recipe.sh "$name" "$dest" >/dev/null || { failed_suites+=("export-$name"); return; }
  # The exported copy must import its vendored shared package, not this checkout's.
  where=$(cd "$dest" && PYTHONPATH="$dest/shared" "$bin/python" -c "import biorecipes_shared; print(biorecipes_shared.__file__)")
  case "$where" in "$dest"/*) ;; *) echo "export-$name imports shared from $where"; failed_suites+=("export-$name-import");; esac
  PYTHONPATH="$dest/shared" run_suite "export-$name" "$dest" -m smoke
  rm -rf "$(dirname "$dest")"
}

gpu_dry_run() {  # the GPU check's CPU dry run (tiny sizes, same code paths): one junit testcase per check row
  "$bin/python" ci/gpu_check/run.py --device cpu --out "$reports/gpu_check" --junit "$reports/gpu-check.xml" \
    || failed_suites+=(gpu-check-dry-run)
}

run_lane() {  # lane number, jobs...: runs the jobs in order, its log and failed suites into $reports
  local lane=$1 job
  shift
  for job in "$@"; do $job; done >"$reports/lane$lane.log" 2>&1
  printf '%s\n' "${failed_suites[@]}" >"$reports/lane$lane.failed"
}

if [ -n "$only" ]; then
  for name in "${recipes[@]}"; do run_recipe "$name"; done
else
  # Two lanes on two cores (one thread each): the suites share no folders (README blocks and exports run in
  # temporary copies), so running them side by side halves CI's wall time.
  export OMP_NUM_THREADS=1
  lane_of() { case $1 in esm2_fa | omnibiote) echo 1 ;; *) echo 2 ;; esac; }
  lane1=("run_suite tooling ci/tests") lane2=("run_suite shared shared")
  for name in "${recipes[@]}"; do
    if [ "$(lane_of "$name")" = 1 ]; then lane1+=("run_recipe $name"); else lane2+=("run_recipe $name"); fi
  done
  lane1+=(gpu_dry_run)
  run_lane 1 "${lane1[@]}" &
  run_lane 2 "${lane2[@]}" &
  wait
  for lane in 1 2; do
    cat "$reports/lane$lane.log"
    while read -r suite; do [ -n "$suite" ] && failed_suites+=("$suite"); done <"$reports/lane$lane.failed"
  done
fi

"$bin/python" - "$reports" <<'PY'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for report in Path(sys.argv[1]).glob("*.xml"):
    for suite in ET.parse(report).getroot().iter("testsuite"):
        for key in totals:
            totals[key] += int(suite.get(key, 0))
failed = totals["failures"] + totals["errors"]
passed = totals["tests"] - failed - totals["skipped"]
print(f"tests: {passed} passed, {failed} failed, {totals['skipped']} skipped")
PY
if [ ${#failed_suites[@]} -gt 0 ]; then
  echo "FAILED suites: ${failed_suites[*]}"
  exit 1
fi
echo "all suites passed"
