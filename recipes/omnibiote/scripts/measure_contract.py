"""Measure the run contract from outside, like a user, on the bundled sample (figures for the issue note).

    python scripts/measure_contract.py [--kills 15] [--tmpfs]    # --tmpfs mounts a 2 MB tmpfs (needs root) for the disk-full row

Prints one table row per check: kill -9 around saves, SIGTERM, world size 2 -> 1 and 1 -> 2, rerun of a finished run,
disk full, and the longest function of the recipe. Not a test: it takes minutes and may need root.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

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

HERE = Path(__file__).resolve().parents[1]  # the recipe folder: the commands run from there
TINY = "--n_layer 1 --n_head 2 --n_embd 32 --ctx_len 64 --mini_batch_size 2 --batch_size 8 --force_lr --lr 0.03"
TINY += " --val_batches 2 --log_freq 1 --source_weights genbank=0.5,uniprot=0.5 --ramp_fraction 0.3"


def args_for(out: Path, *extra: str) -> list[str]:
    base = ["--base_dir", str(HERE / "sample_data" / "encoded"), "--out_dir", str(out.parent), "--save_name", out.name]
    return [*base, "--token_budget", str(8 * 64 * 40), "--save_freq", "1024", *TINY.split(), *extra]


def python(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "train_encoder.py", *args_for(out, *extra)]


def same_weights(a: Path, b: Path, atol: float = 0.0) -> str:
    wa, wb = (load_file(p / "final_model" / "model.safetensors") for p in (a, b))
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    return "bitwise equal" if worst == 0 else f"max |diff| {worst:.2e}"


def same_metrics(a: Path, b: Path) -> bool:
    drop = {"samples_per_s", "tokens_per_s", "cpu_rss_gib", "cpu_peak_rss_gib", "cuda_peak_gib"}

    def rows(p):
        return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in (p / "metrics.jsonl").open()]

    return rows(a) == rows(b)


def measure(work: Path, kills: int, tmpfs: bool) -> list[tuple[str, str]]:
    rows = []
    reference = work / "reference"
    run_command(python(reference), cwd=HERE)
    killed = work / "killed"
    report = kill_around_saves(python(killed), killed / "checkpoints", kills=kills, cwd=HERE)
    rows.append(
        (
            f"kill -9 x{kills} around saves",
            f"{report.kills} kills, {report.clean_resumes} clean resumes, "
            f"{len(report.failures)} failures; weights {same_weights(reference, killed)}, "
            f"metrics equal: {same_metrics(reference, killed)}",
        )
    )
    term = work / "sigterm"
    proc = subprocess.Popen(python(term), cwd=HERE, stderr=subprocess.PIPE, text=True, env=child_env())
    for line in proc.stderr:
        if "step 5/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate()
    code = proc.returncode
    run_command(python(term), cwd=HERE)
    rows.append(
        (
            "SIGTERM at step 5, rerun",
            f"exit {code}; resumed run: weights {same_weights(reference, term)}, "
            f"metrics equal: {same_metrics(reference, term)}",
        )
    )
    for first, second in ((2, 1), (1, 2)):
        out = work / f"ws{first}{second}"
        for nproc, extra in ((first, ["--max_steps", "10"]), (second, [])):
            cmd = (
                python(out, *extra)
                if nproc == 1
                else torchrun_command("train_encoder.py", args_for(out, *extra), nproc)
            )
            result = run_command(cmd, cwd=HERE, check=False)
        rows.append(
            (
                f"resume {first} -> {second} processes",
                f"exit {result.returncode}; continues from the global "
                f"position; vs 1-process reference: {same_weights(reference, out)}",
            )
        )
    final = reference / "final_model" / "model.safetensors"
    before = (final.stat().st_mtime_ns, final.read_bytes())
    result = run_command(python(reference), cwd=HERE)
    unchanged = (final.stat().st_mtime_ns, final.read_bytes()) == before
    lines = [x for x in (result.stdout + result.stderr).splitlines() if x.strip()]
    rows.append(
        ("rerun of a finished run", f"exit {result.returncode}, {len(lines)} line, final_model unchanged: {unchanged}")
    )
    if tmpfs:
        rows.append(("disk full (2 MB tmpfs output dir)", disk_full(work)))
    product = [*HERE.glob("*.py"), *HERE.glob("preprocessing/*.py"), *HERE.glob("scripts/*.py")]
    rows.append(("longest function in the recipe", longest_function(product)))
    return rows


def disk_full(work: Path) -> str:
    with small_disk(work / "tmpfs", "2M") as mount:
        out = mount / "run"
        first = run_command(python(out, "--n_embd", "128", "--n_head", "4"), cwd=HERE, check=False)
        message = (first.stderr.strip().splitlines() or ["(none)"])[-1]
        leftovers = sorted(p.name for p in out.rglob(".tmp-*"))
        second = run_command(python(out, "--n_embd", "128", "--n_head", "4"), cwd=HERE, check=False)
        again = (second.stderr.strip().splitlines() or ["(none)"])[-1]
        subprocess.run(["mount", "-o", "remount,size=64M", str(mount)], check=True)  # the user frees space
        third = run_command(python(out, "--n_embd", "128", "--n_head", "4"), cwd=HERE, check=False)
        return (
            f"exit {first.returncode}: `{message}`; temp files left: {leftovers or 'none'}; "
            f"next run on the same full disk: exit {second.returncode}: `{again}`; "
            f"after freeing space: exit {third.returncode}, finished: {(out / 'run_finished.json').is_file()}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--tmpfs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(tmp), args.kills, args.tmpfs)
    print("| check | result |\n| --- | --- |")
    for check, result in rows:
        print(f"| {check} | {result} |")


if __name__ == "__main__":
    main()
