"""The command line: Hydra sweeps (-m) run every job, each in its own run folder; bad overrides and input paths are
one `error:` line, exit 1, before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

STEPS = ["train.max_steps=2", "train.steps_per_epoch=2", "train.save_every=2"]


def sweep(gtdb_fixture, tmp_path, *extra: str) -> list[str]:
    return ["-m", "--config-name", "sample", *tiny_overrides(gtdb_fixture, tmp_path), *STEPS, *extra]


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_sweep_over_run_dir_runs_every_job_in_its_folder(gtdb_fixture, tmp_path):
    import train

    assert train.main(sweep(gtdb_fixture, tmp_path, f"output_dir={tmp_path / 'a'},{tmp_path / 'b'}")) == 0
    for name in ("a", "b"):
        assert json.loads((tmp_path / name / "run_finished.json").read_text())["step"] == 2
        assert (tmp_path / name / "final_model" / "model.safetensors").is_file()


def test_sweep_over_lr_with_one_run_dir_gets_a_folder_per_job_and_keeps_it(gtdb_fixture, tmp_path, capsys):
    import train

    run = tmp_path / "run"
    assert train.main(sweep(gtdb_fixture, tmp_path, "train.lr=0.01,0.05")) == 0
    assert not (run / "checkpoints").exists()  # job 0 did not take the shared folder
    for number, lr in enumerate(("0.01", "0.05")):
        assert json.loads((run / str(number) / "run_finished.json").read_text())["step"] == 2
        assert json.loads((run / str(number) / "sweep_job.json").read_text()) == {
            "job": number,
            "swept": {"train.lr": lr},
        }
    weights = [load_file(run / n / "final_model" / "model.safetensors") for n in ("0", "1")]
    assert any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0])  # each ran with its own lr
    capsys.readouterr()

    # Other values for the same job numbers: refused before any job starts, nothing changed.
    assert train.main(sweep(gtdb_fixture, tmp_path, "train.lr=0.05,0.01")) == 1
    assert error_line(capsys) == (
        f"error: {run / '0'} holds sweep job 0 with train.lr=0.01, not train.lr=0.05: resuming it would mix "
        "hyper-parameters; use a new output_dir"
    )
    # The same sweep again: every job is already finished.
    assert train.main(sweep(gtdb_fixture, tmp_path, "train.lr=0.01,0.05")) == 0
    assert capsys.readouterr().out.count("already finished at step 2") == 2


def test_error_in_a_sweep_job_is_one_line_exit_1_and_stops_the_sweep(gtdb_fixture, tmp_path, capsys):
    import train

    missing = tmp_path / "nope"
    assert train.main(sweep(gtdb_fixture, tmp_path, f"train.resume={missing},true")) == 1
    assert error_line(capsys) == f"error: resume checkpoint {missing} does not exist"
    assert not (tmp_path / "run" / "1").exists()


def test_a_bad_value_in_any_sweep_job_is_refused_before_the_first_starts(gtdb_fixture, tmp_path, capsys):
    import train

    assert train.main(sweep(gtdb_fixture, tmp_path, "train.lr=0.01,-1")) == 1
    assert error_line(capsys) == "error: train.lr=-1.0 must be >= 0"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "train.foo=1",
            "Could not override 'train.foo'; To append to your config use +train.foo=1; Key 'foo' not in 'TrainConfig'",
        ),  # fmt: skip
        (
            "train.lr=[1",
            "cannot parse the override 'train.lr=[1': no viable alternative at input '[1' "
            "(see Hydra's override grammar)",
        ),  # fmt: skip
        ("data.genomes_root=/nonexistent", "data.genomes_root=/nonexistent: folder not found"),
        (
            "train.lr=1,2",
            "Ambiguous value for argument 'train.lr=1,2'; 1. To use it as a list, use "
            "key=[value1,value2]; 2. To use it as string, quote the value: key='value1,value2'; 3. To sweep over it, "
            "add --multirun to your command line",
        ),  # fmt: skip
        ("--cfg=yaml", "--cfg takes job or all, not 'yaml'"),
    ],
)
def test_bad_override_or_input_folder_is_one_line(gtdb_fixture, tmp_path, capsys, override, message):
    import train

    assert train.main(["--config-name", "sample", *tiny_overrides(gtdb_fixture, tmp_path), override]) == 1
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_a_folder_without_the_genomes_is_one_line_naming_it(gtdb_fixture, tmp_path, capsys):
    import train

    overrides = [*tiny_overrides(gtdb_fixture, tmp_path), f"data.genomes_root={gtdb_fixture}"]  # not its database/
    assert train.main(["--config-name", "sample", *overrides]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "skipped" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: data.genomes_root={gtdb_fixture}: none of the first 20 genomes of the split is")
