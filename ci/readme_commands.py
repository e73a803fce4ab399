"""Run every README command block marked to run on the bundled sample, as a user would, and fail on any error.

A block is marked by a line directly above its ```bash (or ```sh) fence:

    <!-- ci: run -->
    <!-- ci: run; replace "training.max_steps=600" -> "training.max_steps=4" -->

`replace` clauses (any number, `;`-separated) shorten a block for CI; they are applied to the block's text, and a
clause that matches nothing is an error (the README changed under it). Each recipe's blocks run in order, in one
fresh exported copy of the recipe (`ci/export_recipe.sh`), with the project's venv first on PATH, under
`bash -euo pipefail`; later blocks may use what earlier ones wrote.

    python ci/readme_commands.py                 # every recipe
    python ci/readme_commands.py geneformer      # one recipe
    python ci/readme_commands.py --list          # show the marked blocks and their replacements
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!--\s*ci:\s*run\s*(?P<rest>.*?)\s*-->\s*$")
REPLACE = re.compile(r'^replace\s+"(?P<old>(?:[^"\\]|\\.)*)"\s*->\s*"(?P<new>(?:[^"\\]|\\.)*)"$')
FENCE = re.compile(r"^```(?:bash|sh|shell|console)?\s*$")
BLOCK_TIMEOUT_S = 600


class ReadmeError(ValueError):
    """A marker that cannot be honoured: no fence after it, a bad clause, a replacement that matches nothing."""


@dataclass
class Block:
    readme: Path
    line: int  # 1-based line of the marker
    text: str
    replacements: list[tuple[str, str]] = field(default_factory=list)

    def command(self) -> str:
        text = self.text
        for old, new in self.replacements:
            if old not in text:
                raise ReadmeError(f'{self.readme}:{self.line}: replace "{old}" matches nothing in the block')
            text = text.replace(old, new)
        return text


def _unescape(text: str) -> str:
    return text.replace('\\"', '"').replace("\\\\", "\\")


def _parse_clauses(rest: str, where: str) -> list[tuple[str, str]]:
    replacements = []
    for clause in (c.strip() for c in rest.split(";")):
        if not clause:
            continue
        match = REPLACE.match(clause)
        if not match:
            raise ReadmeError(f'{where}: cannot read "{clause}" (expected: replace "OLD" -> "NEW")')
        replacements.append((_unescape(match["old"]), _unescape(match["new"])))
    return replacements


def marked_blocks(readme: Path) -> list[Block]:
    """The marked command blocks of one README, in order. Raises ReadmeError for a malformed marker."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    blocks = []
    for index, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if not match:
            continue
        where = f"{readme}:{index + 1}"
        replacements = _parse_clauses(match["rest"], where)
        fence = index + 1
        if fence >= len(lines) or not FENCE.match(lines[fence].strip()):
            raise ReadmeError(f"{where}: the ci marker must stand directly above a ```bash fence")
        end = next((i for i in range(fence + 1, len(lines)) if lines[i].strip() == "```"), None)
        if end is None:
            raise ReadmeError(f"{where}: the code block is never closed")
        blocks.append(Block(readme, index + 1, "\n".join(lines[fence + 1 : end]) + "\n", replacements))
    return blocks


def recipe_blocks(recipes: list[str] | None = None) -> dict[str, list[Block]]:
    found = {}
    for readme in sorted(ROOT.glob("recipes/*/README.md")):
        name = readme.parent.name
        if recipes and name not in recipes:
            continue
        blocks = marked_blocks(readme)
        if blocks:
            found[name] = blocks
    return found


def _environment() -> dict[str, str]:
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("VIRTUAL_ENV", str(venv_bin.parent))
    return env


def run_recipe(name: str, blocks: list[Block]) -> list[str]:
    """Run one recipe's blocks in an exported copy; returns one failure line per failed block (empty: all passed)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"readme-{name}-"))
    dest = workdir / name
    failures = []
    try:
        subprocess.run(["bash", str(ROOT / "ci/export_recipe.sh"), name, str(dest)], check=True, capture_output=True)
        env = _environment()
        env["PYTHONPATH"] = f"{dest / 'shared'}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
        for block in blocks:
            where = f"{os.path.relpath(block.readme, ROOT)}:{block.line}"
            start = time.perf_counter()
            try:
                result = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", block.command()],
                    cwd=dest,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=BLOCK_TIMEOUT_S,
                )
                code, output = result.returncode, (result.stdout + result.stderr).strip()
            except subprocess.TimeoutExpired:
                code, output = "timeout", f"still running after {BLOCK_TIMEOUT_S} s"
            except ReadmeError as err:
                code, output = "marker", str(err)
            seconds = time.perf_counter() - start
            print(f"{'ok  ' if code == 0 else 'FAIL'} {where} ({seconds:.0f} s)", flush=True)
            if code != 0:
                tail = "\n".join(output.splitlines()[-15:])
                print(f"---- {where} exited {code}; last lines:\n{tail}\n----", flush=True)
                failures.append(f"{where}: exit {code}")
                break  # later blocks depend on this one
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", help="recipe names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the marked blocks and exit")
    args = parser.parse_args(argv)
    try:
        found = recipe_blocks(args.recipes)
    except ReadmeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.list:
        for name, blocks in found.items():
            for block in blocks:
                print(f"{name}: {os.path.relpath(block.readme, ROOT)}:{block.line}\n{block.command()}")
        return 0
    failures = [line for name, blocks in found.items() for line in run_recipe(name, blocks)]
    total = sum(len(b) for b in found.values())
    print(f"README blocks: {len(found)} recipe(s), {total} marked block(s), {len(failures)} failed")
    for line in failures:
        print(f"FAILED {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
