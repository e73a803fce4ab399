#!/usr/bin/env bash
# Copy one recipe out of the monorepo into DEST as a standalone project: the recipe, a vendored copy of shared/
# (as DEST/shared, installed by DEST/requirements-standalone.txt), and its tests. Never writes into an existing non-empty DEST.
set -euo pipefail
recipe=$1
dest=$2
cd "$(dirname "$0")/.."
src=recipes/$recipe
[ -d "$src" ] || { echo "error: no recipe '$recipe' under recipes/" >&2; exit 2; }
if [ -e "$dest" ] && [ -n "$(ls -A "$dest" 2>/dev/null)" ]; then
  echo "error: $dest exists and is not empty; export writes only into a new or empty directory" >&2
  exit 2
fi
mkdir -p "$(dirname "$dest")"
tmp=$(mktemp -d "$(dirname "$dest")/.export-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
copy_tree() {  # copy what git would track (ignored run outputs, caches and fixtures stay behind)
  local from=$1 to=$2
  if git -C "$from" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$from" && git ls-files -z --cached --others --exclude-standard -- . | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) |
      tar -C "$from" --null -T - -cf - | tar -C "$to" -xf -
  else
    tar -C "$from" --exclude=__pycache__ --exclude=.pytest_cache --exclude=outputs --exclude=runs --exclude=.venv \
      --exclude='*.egg-info' -cf - . | tar -C "$to" -xf -
  fi
}
copy_tree "$src" "$tmp"
cp docker/base.Dockerfile "$tmp/Dockerfile.base"  # the shared base image the recipe's Dockerfile builds FROM
mkdir -p "$tmp/shared"
copy_tree shared "$tmp/shared"
rm -rf "$tmp/shared/tests"
{
  echo "# Installs this exported recipe without the biorecipes repo: run from this folder, after installing torch"
  echo "# (pip install torch==2.13.0 for CPU). ./shared is the vendored biorecipes_shared package."
  echo "./shared"
  echo "-r requirements.txt"
} > "$tmp/requirements-standalone.txt"
cat > "$tmp/EXPORTED.md" <<TXT
This folder was exported from the biorecipes monorepo (recipes/$recipe) with \`make export\`.
- \`shared/\` is a vendored copy of the biorecipes_shared package; \`requirements-standalone.txt\` installs it and \`requirements.txt\`.
- Set up: \`python -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -r requirements-standalone.txt\`$( [ -f "$src/requirements-nodeps.txt" ] && printf ' && pip install --no-deps -r requirements-nodeps.txt')
- Tests: \`pytest\`. Docker, from this folder: \`docker build -f Dockerfile.base -t biorecipes/base:latest . && docker build --build-arg RECIPE_DIR=. -t biorecipes/$recipe .\`
TXT
[ -d "$dest" ] && rmdir "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "exported recipes/$recipe to $dest"
