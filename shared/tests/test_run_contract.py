"""The run contract: atomic writes, resume policy, finished runs, world-size changes, one-line errors, kill -9."""

import errno
import json
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import toy_command
from safetensors.torch import load_file

from biorecipes_shared import checkpoint as checkpoint_module
from biorecipes_shared import export as export_module
from biorecipes_shared import files as files_module
from biorecipes_shared.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from biorecipes_shared.files import WriteError, atomic_dir, atomic_write, atomic_write_json
from biorecipes_shared.logging_utils import MetricsWriter, read_metrics
from biorecipes_shared.run import (
    ConfigError,
    RunError,
    RunLayout,
    check_settings,
    finished_run,
    mark_finished,
    normalise_resume,
    resolve_resume,
    run_cli,
)
from biorecipes_shared.testing import kill_around_saves


def small_model():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_atomic_write_leaves_nothing_on_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "meta.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(ZeroDivisionError), atomic_write(target) as handle:
        handle.write("half")
        raise ZeroDivisionError
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_atomic_write_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    real_open = open

    def full_disk_open(path, *args, **kwargs):
        handle = real_open(path, *args, **kwargs)
        handle.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", str(path)))
        return handle

    monkeypatch.setattr("builtins.open", full_disk_open)
    with pytest.raises(WriteError) as info, atomic_write(tmp_path / "x.txt") as handle:
        handle.write("data")
    monkeypatch.undo()
    message = str(info.value)
    assert "no space left on device" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_existing_and_cleans_up(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError), atomic_dir(tmp_path / "out"):
        pass
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "new") as tmp:
        (tmp / "shard-0").write_text("x")
        raise RuntimeError("bad record")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(tmp_path / "new") as tmp:
        (tmp / "shard-0").write_text("x")
    assert (tmp_path / "new" / "shard-0").read_text() == "x"


def test_checkpoint_write_failure_is_one_line_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    model, optimizer = small_model()
    save_checkpoint(tmp_path, 1, model, optimizer)

    def no_space(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint_module.torch, "save", no_space)
    monkeypatch.setattr(files_module, "_free_bytes", lambda path: 0)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(tmp_path, 2, model, optimizer)
    monkeypatch.undo()
    assert "\n" not in str(info.value) and "step_00000002" in str(info.value) and "no space left" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_a_safetensors_error_on_a_full_disk_is_one_line_too(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    model, optimizer = small_model()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    monkeypatch.setattr(export_module, "save_file", full)
    monkeypatch.setattr(files_module, "_free_bytes", lambda path: 0)
    with pytest.raises(CheckpointWriteError, match="no space left on device"):
        save_checkpoint(tmp_path, 1, model, optimizer)
    with pytest.raises(WriteError, match="no space left on device"):
        checkpoint_module.export_safetensors(model, {}, tmp_path / "final_model")
    assert list(tmp_path.iterdir()) == []


def test_rotation_leftovers_are_removed_and_the_newest_valid_one_is_resumed(tmp_path):
    model, optimizer = small_model()
    for step in (5, 10):
        save_checkpoint(tmp_path, step, model, optimizer, keep_last=0)
    (tmp_path / "step_00000015").mkdir()  # a kill during rotation or a foreign folder: no manifest
    (tmp_path / "step_00000015" / "training_state.pt").write_bytes(b"partial")
    (tmp_path / ".tmp-step_00000020").mkdir()
    (tmp_path / ".trash-step_00000003").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = resolve_resume("auto", tmp_path)
    assert chosen.name == "step_00000010"
    assert any("incomplete" in str(w.message) for w in caught)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005", "step_00000010"]


def test_rotation_keeps_the_newest_k(tmp_path):
    model, optimizer = small_model()
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model, optimizer, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_resume_policies(tmp_path):
    assert resolve_resume("auto", tmp_path / "missing") is None
    assert [normalise_resume(v) for v in (True, None, "latest", "true", False, "false", "none")] == ["auto"] * 4 + [
        "none"
    ] * 3
    model, optimizer = small_model()
    path = save_checkpoint(tmp_path, 3, model, optimizer)
    assert resolve_resume(True, tmp_path) == path
    assert resolve_resume(str(path), tmp_path) == path
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        resolve_resume("none", tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(tmp_path / "step_00000099"), tmp_path)
    (path / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="fail their manifest check"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolve_resume("auto", tmp_path)


def test_a_finished_run_stays_finished_unless_more_steps_are_asked_for(tmp_path):
    layout = RunLayout(tmp_path)
    assert finished_run(layout, 10) is None
    mark_finished(layout, 10, "max steps reached")
    assert finished_run(layout, 10)["step"] == 10
    assert finished_run(layout, 20) is None
    mark_finished(layout, 12, "early stopping", early_stopped=True)
    assert finished_run(layout, 100)["reason"] == "early stopping"
    assert layout.checkpoints == tmp_path / "checkpoints" and layout.final_model == tmp_path / "final_model"


def test_another_world_size_is_refused_for_per_rank_positions_and_continued_for_global_ones(tmp_path):
    model, optimizer = small_model()
    path = save_checkpoint(tmp_path, 4, model, optimizer, data_state={"samples_seen": 64})
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["world_size"] = 2  # as if saved by torchrun --nproc_per_node=2
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"saved by 2 process\(es\) and this run has 1"):
        load_checkpoint(path, model, optimizer)
    with pytest.warns(UserWarning, match="global data position"):
        state = load_checkpoint(path, model, optimizer, data_position="global")
    assert state.data_state == {"samples_seen": 64} and state.world_size == 2


def test_settings_are_checked_in_one_place():
    check_settings([("lr", 1e-3, "positive"), ("mask", 0.15, "open_fraction"), ("steps", 3, "count")])
    for bad, match in [
        (("training.learning_rate", -1.0, "positive"), "must be > 0"),
        (("training.learning_rate", float("nan"), "positive"), "finite"),
        (("data.max_n_fraction", 2, "fraction"), r"\[0, 1\]"),
        (("training.steps", 0, "count"), "integer >= 1"),
        (("dropout", 1.0, "unit_interval_right_open"), r"\[0, 1\)"),
    ]:
        with pytest.raises(ConfigError, match=match):
            check_settings([bad])


def test_run_cli_turns_user_and_disk_errors_into_one_line(capsys):
    assert run_cli(lambda: None) == 0

    def bad_setting():
        raise ConfigError("training.learning_rate=nan must be a finite number")

    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "/out/metrics.jsonl")

    def domain_error():
        raise KeyError("gene X")

    assert run_cli(bad_setting) == 1
    assert run_cli(full_disk) == 1
    assert run_cli(domain_error, user_errors=(KeyError,)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: training.learning_rate=nan must be a finite number",
        "error: /out/metrics.jsonl: no space left on device (free some space or choose another output directory)",
        "error: gene X",
    ]
    assert issubclass(ConfigError, RunError)


def test_metrics_of_steps_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    writer = MetricsWriter(tmp_path, tsv_files={"loss.tsv": ["step", "loss"]})
    for step in range(1, 8):
        writer.log(step, loss=float(step))
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 8, "lo')  # the line a kill cut
    MetricsWriter(tmp_path, tsv_files={"loss.tsv": ["step", "loss"]}, resume_step=5)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert (tmp_path / "loss.tsv").read_text().splitlines() == ["step\tloss"] + [
        f"{s}\t{float(s)}" for s in range(1, 6)
    ]


@pytest.mark.slow
def test_kill_9_around_saves_then_the_same_command_finishes_like_an_uninterrupted_run(tmp_path, toy):
    def command(run_dir):
        return toy_command(
            "--output-dir",
            str(run_dir),
            "--steps",
            "30",
            "--save-every",
            "3",
            "--resume",
            "--sleep",
            "0.02",
        )

    toy(*command(tmp_path / "straight")[2:])
    report = kill_around_saves(command(tmp_path / "killed"), tmp_path / "killed" / "checkpoints", kills=4, seed=1)
    assert report.kills == 4 and report.failures == [], report
    straight, killed = (load_file(tmp_path / d / "final_model" / "model.safetensors") for d in ("straight", "killed"))
    assert all(torch.equal(straight[k], killed[k]) for k in straight)
    losses = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "killed" / "metrics.jsonl")]
    assert losses == [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    rerun = toy(*command(tmp_path / "killed")[2:])
    assert "already finished at step 30" in rerun.stdout
