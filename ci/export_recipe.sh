#!/usr/bin/env bash
# Copy one recipe out of the monorepo into DEST as a standalone project: the recipe, a vendored copy of shared/
# (as DEST/shared, installed by DEST/requirements.txt), and its tests. Never writes into an existing non-empty DEST.
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
excludes=(--exclude=__pycache__ --exclude=.pytest_cache --exclude=outputs --exclude=runs --exclude=.venv --exclude='*.egg-info')
tar -C "$src" "${excludes[@]}" -cf - . | tar -C "$tmp" -xf -
mkdir -p "$tmp/shared"
tar -C shared "${excludes[@]}" --exclude=tests -cf - . | tar -C "$tmp/shared" -xf -
{
  echo "# Exported from biorecipes: install torch first (pip install torch==2.13.0 for CPU), then this file."
  echo "./shared"
  [ -f "$src/requirements.txt" ] && grep -v '^\s*#' "$src/requirements.txt" | sed '/^\s*$/d'
} > "$tmp/requirements.txt"
cat > "$tmp/EXPORTED.md" <<TXT
This folder was exported from the biorecipes monorepo (recipes/$recipe) with \`make export\`.
- \`shared/\` is a vendored copy of the biorecipes_shared package; \`requirements.txt\` installs it.
- Set up: \`python -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -r requirements.txt\`$( [ -f "$src/requirements-nodeps.txt" ] && printf ' && pip install --no-deps -r requirements-nodeps.txt')
- Tests: \`pytest\`. Docker: \`docker build --build-arg RECIPE_DIR=. -t biorecipes/$recipe .\` from this folder.
TXT
[ -d "$dest" ] && rmdir "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "exported recipes/$recipe to $dest"
