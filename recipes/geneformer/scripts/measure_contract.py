"""Measure the run contract from outside, like a user, on the bundled sample (numbers for the issue note).

    python scripts/measure_contract.py [--kills 15] [--tmpfs]      # --tmpfs needs root (mount -t tmpfs)

Prints one table: kill -9 around saves, SIGTERM, world size 2 -> 1 and 1 -> 2, finished rerun, full disk, and the
longest function of the recipe. Slow (every run is a fresh process); not a test.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from biorecipes_shared import testing

RECIPE = Path(__file__).resolve().parents[1]
TRAIN = str(RECIPE / "train.py")
SMALL = [
    "data.max_seq_length=64",
    "data.micro_batch_size=4",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_attention_heads=2",
    "training.log_every_n_steps=1",
    "model.hidden_dropout_prob=0.1",
]


def command(out: Path, steps: int, save_every: int, nproc: int = 1) -> list[str]:
    args = [
        f"training.output_dir={out}",
        f"training.max_steps={steps}",
        f"training.save_every={save_every}",
        *SMALL,
    ]
    return testing.torchrun_command(TRAIN, args, nproc) if nproc > 1 else [sys.executable, TRAIN, *args]


def losses(out: Path) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def same_run(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "final_model/model.safetensors"), load_file(b / "final_model/model.safetensors")
    return losses(a) == losses(b) and wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def kills(root: Path, count: int) -> str:
    testing.run_command(command(root / "straight", 40, 2), cwd=root)
    report = testing.kill_around_saves(
        command(root / "killed", 40, 2), root / "killed/checkpoints", kills=count, seed=0
    )
    return (
        f"{report.kills} kills, {report.clean_resumes} clean finishes, failures {report.failures}; "
        f"identical to uninterrupted: {same_run(root / 'straight', root / 'killed')}"
    )


def sigterm(root: Path) -> str:
    proc = subprocess.Popen(command(root / "cut", 40, 100), stderr=subprocess.PIPE, text=True, env=testing.child_env())
    for line in proc.stderr:
        if "step 5/40" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate()
    saved = sorted(p.name for p in (root / "cut/checkpoints").iterdir())
    rerun = testing.run_command(command(root / "cut", 40, 100), cwd=root, check=False)
    same = same_run(root / "straight", root / "cut") if rerun.returncode == 0 else False
    return f"exit {proc.returncode}, saved {saved}; rerun exit {rerun.returncode}, identical: {same}"


def world_size(root: Path, before: int, after: int) -> str:
    out = root / f"ws_{before}_{after}"
    testing.run_command(command(out, 4, 4, before), cwd=root)
    second = testing.run_command(command(out, 8, 4, after), cwd=root, check=False)
    position = json.loads(
        json.dumps(
            __import__("torch").load(out / "checkpoints/step_00000008/training_state.pt", weights_only=True)["extra"][
                "data_position"
            ]
        )
    )
    warning = [line for line in second.stderr.splitlines() if "resumed by" in line]
    return f"exit {second.returncode}, position {position} (expected cells_done {16 * (before + after)}); {warning[:1]}"


def finished(root: Path) -> str:
    final = root / "straight/final_model/model.safetensors"
    before = (final.stat().st_mtime_ns, final.read_bytes())
    rerun = testing.run_command(command(root / "straight", 40, 2), cwd=root, check=False)
    same = (final.stat().st_mtime_ns, final.read_bytes()) == before
    return f"exit {rerun.returncode}, output {rerun.stdout.strip()!r}, final_model untouched: {same}"


def disk_full(root: Path) -> str:
    with testing.small_disk(root / "tiny_disk", "1m") as mount:
        first = testing.run_command(command(mount / "run", 6, 2), cwd=root, check=False)
        checkpoints = mount / "run/checkpoints"
        left = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.exists() else []
        second = testing.run_command(command(mount / "run", 6, 2), cwd=root, check=False)
    return (
        f"exit {first.returncode}, stderr {first.stderr.strip().splitlines()[-1:]}, checkpoints left {left}; "
        f"next run: exit {second.returncode}, {second.stderr.strip().splitlines()[-1:]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--tmpfs", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = [
            ("kill -9 around saves", kills(root, args.kills)),
            ("SIGTERM", sigterm(root)),
            ("world size 2 -> 1", world_size(root, 2, 1)),
            ("world size 1 -> 2", world_size(root, 1, 2)),
            ("finished rerun", finished(root)),
        ]
        if args.tmpfs:
            rows.append(("disk full (tmpfs)", disk_full(root)))
        rows.append(("longest function", testing.longest_function(RECIPE.glob("*.py"))))
    for name, value in rows:
        print(f"| {name} | {value} |", flush=True)


if __name__ == "__main__":
    main()
