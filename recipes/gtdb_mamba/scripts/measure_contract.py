"""Measure the run contract from outside, like a user, on the bundled fixture (not a test; run by hand):

    cd recipes/gtdb_mamba && python scripts/build_sample.py --out fixture && python scripts/measure_contract.py [--kills 15] [--tmpfs]

Prints one line per check: kill -9 around saves, SIGTERM, rerun of a finished run, another world size, disk full
(tmpfs, needs root), the longest function, and the same-genome AUC recomputed from `embed.py` output on the
validation genomes against the training log's AUC for the same model and fragments.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
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
sys.path.insert(0, str(RECIPE))


def command(work: Path, output_dir: Path, *extra: str) -> list[str]:
    overrides = [
        f"output_dir={output_dir}", f"data.cache_dir={work / 'cache'}", "data.num_workers=0", "train.max_steps=30",
        "train.steps_per_epoch=10", "train.log_every=1", "val.at_start=false",
    ]  # fmt: skip
    return [sys.executable, "train.py", "--config-name", "sample", *overrides, *extra]


def same_final(a: Path, b: Path) -> bool:
    x, y = load_file(a / "final_model/model.safetensors"), load_file(b / "final_model/model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def downstream_auc(work: Path, run_dir: Path) -> tuple[float, float]:
    """(AUC from embed.py output on the validation genomes, the training log's AUC at the last step)."""
    from config import compose_config
    from metrics import same_genome_auc
    from preprocess import cached_family_split

    data = compose_config("sample", []).data
    keys = ("contamination_column", "max_contamination", "val_species_target", "n_val_genomes", "family_count_cap",
            "val_per_genus", "train_per_genus")  # fmt: skip
    split = cached_family_split(
        list(data.metadata_files), data.genomes_root, work / "cache", seed=42, **{k: getattr(data, k) for k in keys}
    )
    out = work / "val_embeddings"
    run_command([sys.executable, "embed.py", "--model", str(run_dir / "final_model"), "--out", str(out),
                 *[e.path for e in split.val]], cwd=RECIPE)  # fmt: skip
    matrix = torch.from_numpy(np.load(f"{out}.npy"))
    genomes = [line.split(":")[0] for line in Path(f"{out}.ids.txt").read_text().splitlines()]
    labels = torch.tensor([sorted(set(genomes)).index(g) for g in genomes])
    auc = same_genome_auc(matrix, labels)[0]
    logged = float((run_dir / "AUC_log.tsv").read_text().splitlines()[-1].split("\t")[0])
    return auc, logged


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--tmpfs", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gtdb_contract_"))
    ref = work / "reference"
    run_command(command(work, ref), cwd=RECIPE)

    report = kill_around_saves(command(work, work / "killed", "train.save_every=1"), work / "killed/checkpoints",
                               kills=args.kills, cwd=RECIPE)  # fmt: skip
    print(f"kill -9 x{report.kills}: {report.clean_resumes} clean runs, failures {report.failures}, "
          f"final weights equal: {same_final(ref, work / 'killed')}")  # fmt: skip

    proc = subprocess.Popen(
        command(work, work / "term"), cwd=RECIPE, env=child_env(), stderr=subprocess.PIPE, text=True
    )
    for line in proc.stderr:
        if "step 3: loss" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.stderr.read()
    code = proc.wait()
    run_command(command(work, work / "term"), cwd=RECIPE)
    print(f"SIGTERM: exit {code}; rerun final weights equal: {same_final(ref, work / 'term')}")

    again = run_command(command(work, ref), cwd=RECIPE, check=False)
    print(f"finished rerun: exit {again.returncode}, stdout {again.stdout.strip()!r}")

    for first, second in ((2, 1), (1, 2)):
        out = work / f"ws{first}{second}"

        def launch(nproc: int, *extra: str, out: Path = out) -> list[str]:
            cmd = command(work, out, "train.batch_size=8", *extra)
            return torchrun_command("train.py", cmd[2:], nproc=nproc) if nproc > 1 else cmd

        run_command(launch(first, "train.stop_at_step=4"), cwd=RECIPE)
        result = run_command(launch(second), cwd=RECIPE, check=False)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        print(f"world size {first} -> {second}: exit {result.returncode}; {errors[:1]}")

    if args.tmpfs:
        with small_disk(work / "tmpfs", "400k") as disk:
            for attempt in (1, 2):
                result = run_command(command(work, disk / "run", "train.save_every=5"), cwd=RECIPE, check=False)
                left = sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if ".tmp" in p.name)
                lines = result.stderr.strip().splitlines()
                ckpts = sorted(p.name for p in (disk / "run/checkpoints").glob("step_*"))
                print(f"disk full run {attempt}: exit {result.returncode}, last line {lines[-1]!r}, "
                      f"temporary files left {left}, checkpoints {ckpts}")  # fmt: skip
    print("longest function:", longest_function(RECIPE.glob("*.py")))
    auc, logged = downstream_auc(work, ref)
    print(f"same-genome AUC from embed.py output {auc:.6f} vs training log {logged:.6f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
