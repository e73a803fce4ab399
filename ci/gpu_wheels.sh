#!/usr/bin/env bash
# `make gpu-wheels`: download the wheels of ci/gpu_wheels.txt for Python 3.12 manylinux x86-64 into DIR (default .whl)
# and those of ci/gpu_wheels_faesm.txt into DIR/faesm, replacing what an earlier run left there, and print their
# total size (refused above 50 MiB: the whole working tree travels to the GPU machine within 64 MiB). A requirement with no wheel on PyPI (a pure-Python sdist) is built
# into a wheel here; a built wheel that is not pure Python is refused.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python=${PYTHON:-python3}
limit_mib=50
mkdir -p "$dest"
platform_args=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform any)
fetch() {  # requirement list, folder: every wheel of the list, one per requirement
  local list=$1 dir=$2
  mkdir -p "$dir"
  rm -f "$dir"/*.whl
  grep -v '^\s*#' "$list" | sed 's/#.*//' | awk 'NF {print $1}' | while read -r requirement; do
    if ! "$python" -m pip download --quiet --no-deps "${platform_args[@]}" -d "$dir" "$requirement" 2>/dev/null; then
      echo "no wheel on the index for $requirement: building one from its sdist"
      "$python" -m pip wheel --quiet --no-deps -w "$dir" "$requirement"
    fi
  done
  bad=$(ls "$dir"/*.whl | grep -v -E 'cp312|abi3|py3-none-any|py2.py3-none-any|py312-none-any' || true)
  if [ -n "$bad" ]; then echo "error: not usable on the GPU machine's Python 3.12: $bad" >&2; exit 1; fi
  count=$(ls "$dir"/*.whl | wc -l)
  expected=$(grep -v '^\s*#' "$list" | sed 's/#.*//' | awk 'NF' | wc -l)
  if [ "$count" -ne "$expected" ]; then echo "error: $count wheels in $dir for $expected requirements" >&2; exit 1; fi
}
fetch ci/gpu_wheels.txt "$dest"
# esm2_fa's faesm row needs transformers 4.53, which cannot share a site with the 5.25 above: its own folder.
fetch ci/gpu_wheels_faesm.txt "$dest/faesm"
count=$(ls "$dest"/*.whl "$dest"/faesm/*.whl | wc -l)
bytes=$(cat "$dest"/*.whl "$dest"/faesm/*.whl | wc -c)
mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
echo "$count wheels in $dest: $mib MiB"
if awk -v b="$bytes" -v l="$limit_mib" 'BEGIN {exit !(b > l * 1048576)}'; then
  echo "error: $mib MiB of wheels is over the $limit_mib MiB limit (the tree travels within 64 MiB)" >&2
  exit 1
fi
