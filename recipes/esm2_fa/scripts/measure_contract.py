"""Measure the run contract from outside, like a user, on the bundled sample (for the issue note; not a test).

    python scripts/measure_contract.py --work /tmp/esm_contract [--kills 15] [--tmpfs]

Preprocesses sample_data/ once, then: kill -9 around saves (N kills) vs an uninterrupted run; SIGTERM exit code
and resume identity; 2 -> 1 and 1 -> 2 processes; rerun of a finished run; with --tmpfs (root, Linux) a full
disk on a small tmpfs output folder and what the next run does; the longest function in src/. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
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
TRAIN = RECIPE / "src" / "train.py"
SETTINGS = ["training.max_steps=160", "training.save_every=10", "training.eval_steps=10", "training.logging_steps=10"]


def shards(work: Path) -> tuple[Path, Path]:
    for split in ("train", "val"):
        out = work / "shards" / split
        if not out.is_dir():
            run_command(
                [sys.executable, str(RECIPE / "src" / "data_processing.py"), "--config", "src/config_tiny_cpu.yaml"]
                + [f"--input_fasta=sample_data/{split}.fasta", f"--output_dir={out}", "--max_aa_length=510"]
                + ["--chunk_size=2000", "--shard_size=500"],
                cwd=RECIPE,
            )
    return work / "shards" / "train", work / "shards" / "val"


def command(data: tuple[Path, Path], out: Path, *extra: str, nproc: int = 0) -> list[str]:
    args = ["--config", "src/config_tiny_cpu.yaml", "--train_dir", str(data[0]), "--val_dir", str(data[1])]
    args += ["--output_dir", str(out), *SETTINGS, *extra]
    return torchrun_command(TRAIN, args, nproc=nproc) if nproc else [sys.executable, str(TRAIN), *args]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = (load_file(p / "final_model" / "model.safetensors") for p in (a, b))
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def same_metrics(a: Path, b: Path) -> bool:
    def records(p: Path) -> list[dict]:
        rows = [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "samples_per_s")} for r in rows]  # wall clock

    return records(a) == records(b)


def last_line(result) -> str:
    text = (result.stderr or "") + (result.stdout or "")
    lines = [line for line in text.splitlines() if line.startswith("error:") or "already finished" in line]
    return lines[-1] if lines else text.strip().splitlines()[-1]


def measure_kills(data, work, straight, kills) -> str:
    out = work / "killed"
    report = kill_around_saves(command(data, out), out / "checkpoints", kills=kills, cwd=RECIPE, timeout=3600)
    return (
        f"{report.kills} kills, {report.clean_resumes} clean resumes, {len(report.failures)} failures "
        f"{report.failures}; final weights identical: {same_weights(straight, out)}, "
        f"metrics identical: {same_metrics(straight, out)}"
    )


def measure_sigterm(data, work, straight) -> str:
    out = work / "sigterm"
    proc = subprocess.Popen(command(data, out), cwd=RECIPE, env=child_env(), stdout=subprocess.PIPE, text=True)
    while not (out / "checkpoints" / "step_00000030").is_dir() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate()
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    run_command(command(data, out), cwd=RECIPE)
    return (
        f"exit {proc.returncode}, saved {saved[-1]} ({stdout.strip().splitlines()[-1]!r}); rerun: weights identical "
        f"{same_weights(straight, out)}, metrics identical {same_metrics(straight, out)}"
    )


def measure_world_sizes(data, work) -> str:
    two, one = work / "two", work / "one"
    short = ["training.max_steps=20", "data.num_workers=1"]
    run_command(command(data, two, *short, nproc=2), cwd=RECIPE)
    to_one = run_command(command(data, two, "data.num_workers=1"), cwd=RECIPE, check=False)
    run_command(command(data, one, *short), cwd=RECIPE)
    to_two = run_command(command(data, one, "data.num_workers=1", nproc=2), cwd=RECIPE, check=False)
    return (
        f"2->1: exit {to_one.returncode}, {last_line(to_one)!r}; 1->2: exit {to_two.returncode}, {last_line(to_two)!r}"
    )


def measure_finished(data, straight) -> str:
    final = straight / "final_model" / "model.safetensors"
    before = (final.stat().st_mtime_ns, final.read_bytes())
    result = run_command(command(data, straight), cwd=RECIPE, check=False)
    unchanged = before == (final.stat().st_mtime_ns, final.read_bytes())
    return f"exit {result.returncode}, {result.stdout.strip()!r}, final_model unchanged: {unchanged}"


def measure_disk_full(data, work) -> str:
    with small_disk(work / "tmpfs", "4M") as mount:
        cmd = command(data, mount / "run", "training.keep_last=0")
        first = run_command(cmd, cwd=RECIPE, check=False)
        left = sorted(p.name for p in (mount / "run" / "checkpoints").iterdir())
        second = run_command(cmd, cwd=RECIPE, check=False)
    return (
        f"exit {first.returncode}, {last_line(first)!r}; left: {left}; next run: exit {second.returncode}, "
        f"{last_line(second)!r}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--tmpfs", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = shards(args.work)
    straight = args.work / "straight"
    if not (straight / "run_finished.json").is_file():
        run_command(command(data, straight), cwd=RECIPE)
    rows = {
        "kill -9 around saves": lambda: measure_kills(data, args.work, straight, args.kills),
        "SIGTERM": lambda: measure_sigterm(data, args.work, straight),
        "world size": lambda: measure_world_sizes(data, args.work),
        "finished rerun": lambda: measure_finished(data, straight),
        "disk full (tmpfs 4M)": lambda: measure_disk_full(data, args.work) if args.tmpfs else "not run (--tmpfs)",
        "longest function in src/": lambda: longest_function((RECIPE / "src").glob("*.py")),
    }
    for name, measure in rows.items():
        print(f"| {name} | {measure()} |", flush=True)


if __name__ == "__main__":
    main()
