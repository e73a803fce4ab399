"""Hydra multirun (`-m`): every job runs, each in its own run folder, or the sweep is refused before any job."""

from __future__ import annotations

import json

from conftest import tiny_overrides

import train
from biorecipes_shared import read_metrics


def sweep_args(run_dir, *extra) -> list[str]:
    return ["-m", *tiny_overrides(run_dir, steps=2), *extra]


def test_a_sweep_runs_every_job_in_its_own_folder_and_a_rerun_skips_them(tmp_path, capsys):
    assert train.main(sweep_args(tmp_path, "training.learning_rate=0.001,0.002", "training.warmup_steps=0")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1"]
    for job, lr in (("0", 0.001), ("1", 0.002)):
        assert json.loads((tmp_path / job / "run_finished.json").read_text())["step"] == 2
        assert [record["lr"] for record in read_metrics(tmp_path / job / "metrics.jsonl")] == [
            lr / 2,
            0.0,
        ]  # linear decay over 2 steps, logged after the step
        assert (tmp_path / job / "final_model" / "model.safetensors").is_file()
    capsys.readouterr()
    assert train.main(sweep_args(tmp_path, "training.learning_rate=0.001,0.002", "training.warmup_steps=0")) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all("already finished at step 2" in line for line in out), out


def test_a_swept_output_dir_is_used_as_given(tmp_path, capsys):
    args = sweep_args(tmp_path / "unused", f"training.output_dir={tmp_path / 'a'},{tmp_path / 'b'}")
    assert train.main([*args, "--cfg", "job"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("# job ") == 2 and f"output_dir: {tmp_path / 'b'}\n" in shown
    assert not (tmp_path / "a").exists() and not (tmp_path / "unused").exists()


def test_a_bad_job_or_a_shared_folder_is_refused_before_any_job_starts(tmp_path, capsys):
    assert train.main(sweep_args(tmp_path, "training.learning_rate=0.001,-1")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: training.learning_rate=-1.0 must be >= 0"], err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
    same = f"training.output_dir={tmp_path / 'x'},{tmp_path / 'x'}"
    assert train.main(sweep_args(tmp_path, same)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: sweep jobs would share the run folder {tmp_path / 'x'}: give each job its own training.output_dir"
    ]
    assert not (tmp_path / "x").exists()
