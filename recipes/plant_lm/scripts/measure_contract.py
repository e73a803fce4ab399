"""Measure the run contract from outside, like a user, on the bundled sample (not a test; run by hand):

    cd recipes/plant_lm && python scripts/measure_contract.py [--kills 15] [--tmpfs]   (--tmpfs needs root)

Prints one line per check: kill -9 around saves (clean resumes / failures, final weights == uninterrupted),
SIGTERM (exit code, identity), rerun of a finished run, resume with another world size, disk full (tmpfs).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from biorecipes_shared.testing import (
    child_env,
    kill_around_saves,
    longest_function,
    run_command,
    small_disk,
    torchrun_command,
)

RECIPE = Path(__file__).resolve().parents[1]
TINY = [
    "--data_dir", "sample_data", "--species_distribution", "arabidopsis_thaliana=1.0,arabidopsis_lyrata=0.8",
    "--d_model", "32", "--n_heads", "4", "--n_layers", "1", "--batch_size", "4", "--accumulation_steps", "1",
    "--context_size", "32", "--n_epochs", "1", "--steps_per_epoch", "20", "--warmup_steps", "2",
    "--global_context", "2000", "--num_threads", "1",
]  # fmt: skip


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", *TINY, "--output_dir", str(out), *extra]


def same_final(a: Path, b: Path) -> bool:
    x, y = load_file(a / "final_model/model.safetensors"), load_file(b / "final_model/model.safetensors")
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--tmpfs", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="plant_contract_"))
    run_command(command(work / "reference"), cwd=RECIPE)

    report = kill_around_saves(command(work / "killed", "--save_every", "1"), work / "killed/checkpoints",
                               kills=args.kills, cwd=RECIPE)  # fmt: skip
    print(f"kill -9 x{report.kills}: {report.clean_resumes} clean runs, failures {report.failures}, "
          f"final weights equal: {same_final(work / 'reference', work / 'killed')}")  # fmt: skip

    proc = subprocess.Popen(command(work / "term"), cwd=RECIPE, env=child_env(), stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "step 3 loss" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.stderr.read()
    code = proc.wait()
    run_command(command(work / "term"), cwd=RECIPE)
    print(f"SIGTERM: exit {code}; rerun final weights equal: {same_final(work / 'reference', work / 'term')}")

    again = run_command(command(work / "reference"), cwd=RECIPE, check=False)
    print(f"finished rerun: exit {again.returncode}, stdout {again.stdout.strip()!r}")

    for first, second in ((2, 1), (1, 2)):
        out = work / f"ws{first}{second}"

        def launch(nproc: int, *extra: str, out: Path = out) -> list[str]:
            cmd = command(out, *extra)
            return torchrun_command("train.py", cmd[2:], nproc=nproc) if nproc > 1 else cmd

        run_command(launch(first, "--steps_per_epoch", "4"), cwd=RECIPE)
        result = run_command(launch(second, "--steps_per_epoch", "4", "--n_epochs", "2"), cwd=RECIPE, check=False)
        warning = [line for line in result.stderr.splitlines() if "process(es)" in line]
        print(f"world size {first} -> {second}: exit {result.returncode}; {warning[:1]}")

    if args.tmpfs:
        with small_disk(work / "tmpfs", "3M") as disk:
            for attempt in (1, 2):
                result = run_command(command(disk / "run", "--save_every", "5"), cwd=RECIPE, check=False)
                left = sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if ".tmp" in p.name)
                lines = result.stderr.strip().splitlines()
                print(f"disk full run {attempt}: exit {result.returncode}, {len(lines)} stderr lines, last "
                      f"{lines[-1]!r}, temporary files left {left}, checkpoints "
                      f"{sorted(p.name for p in (disk / 'run/checkpoints').glob('step_*'))}")  # fmt: skip
    print("longest function:", longest_function(RECIPE.glob("*.py")))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
