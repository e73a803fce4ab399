"""TrainingRun in one process: when it saves, what it restores, and how it finishes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from biorecipes_shared import CheckpointError, stop_signals
from biorecipes_shared.logging_utils import MetricsWriter
from biorecipes_shared.training_run import TrainingRun


def parts(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer


def test_it_saves_on_the_interval_at_the_last_step_and_on_a_stop_signal(tmp_path):
    run = TrainingRun(tmp_path, max_steps=10, save_every=4)
    with run:
        assert [step for step in range(1, 11) if run.should_save(step)] == [4, 8, 10]
    stop_signals.forget()
    run = TrainingRun(tmp_path, max_steps=10, save_every=4)
    with run:
        assert not run.should_save(1)
        stop_signals._handle(15, None)  # what SIGTERM does
        assert run.should_save(2) and run.stopped
    assert not stop_signals.requested()  # acted on: a later run in this process starts unflagged
    run = TrainingRun(tmp_path, max_steps=10, save_every=4)
    with run:
        assert not run.stop_requested()
        stop_signals._handle(15, None)  # during set-up, before the first step
        assert run.stop_requested() and run.stopped and not run.finish()


def test_resume_restores_the_registered_parts_and_the_data_position(tmp_path):
    model, optimizer = parts()
    position = {"cells_done": 48}
    run = TrainingRun(tmp_path, max_steps=5, save_every=2)
    run.register(model, optimizer, data_state=lambda: position, extra=lambda: {"vocab_sha256": "abc"})
    assert run.resume() is None
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    run.save(2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    other_model, other_optimizer = parts(seed=1)
    again = TrainingRun(tmp_path, max_steps=5, save_every=2)
    again.register(other_model, other_optimizer)
    state = again.resume()
    assert again.step == 2 and state.data_state == {"cells_done": 48} and state.extra == {"vocab_sha256": "abc"}
    assert all(torch.equal(saved[k], v) for k, v in other_model.state_dict().items())


def test_finish_exports_plots_and_marks_a_run_that_is_then_finished(tmp_path, capsys):
    model, optimizer = parts()
    run = TrainingRun(tmp_path, max_steps=3)
    run.register(model, optimizer)
    run.resume()
    with MetricsWriter(tmp_path, None) as metrics:
        for step in (1, 2, 3):
            metrics.log(step, loss=1.0 / step)
    assert not run.report_finished()
    run.should_save(3)
    exported = []
    assert run.finish(export=lambda folder: exported.append(folder))
    assert exported == [tmp_path / "final_model"]
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    message = TrainingRun(tmp_path, max_steps=3).finished_message()
    assert message and "already finished at step 3" in message
    assert TrainingRun(tmp_path, max_steps=3).report_finished() and message in capsys.readouterr().out
    assert TrainingRun(tmp_path, max_steps=6).finished_message() is None  # more steps asked: it continues


def test_a_stopped_run_does_not_finish(tmp_path):
    run = TrainingRun(tmp_path, max_steps=3)
    run.stopped = True
    assert not run.finish(export=lambda folder: (_ for _ in ()).throw(AssertionError("exported")))
    assert not (tmp_path / "run_finished.json").exists()


def test_rotation_keeps_the_steps_the_recipe_names_and_peek_restores_nothing(tmp_path):
    model, optimizer = parts()
    best = {"step": 2}
    run = TrainingRun(tmp_path, max_steps=10, save_every=2, keep_last=1)
    run.register(model, optimizer, data_state=lambda: {"seen": run.step}, keep=lambda: [best["step"]])
    run.resume()
    for step in (2, 4, 6):
        run.should_save(step)
        run.save(step)
    assert sorted(p.name for p in run.layout.checkpoints.glob("step_*")) == ["step_00000002", "step_00000006"]

    other_model, _ = parts(seed=1)
    before = {k: v.clone() for k, v in other_model.state_dict().items()}
    again = TrainingRun(tmp_path, max_steps=10, save_every=2, keep_last=1)
    again.register(other_model)
    peeked = again.peek()
    assert (peeked.step, peeked.data_state) == (6, {"seen": 6})
    assert all(torch.equal(before[k], v) for k, v in other_model.state_dict().items())  # nothing restored yet
    assert again.resume().path == peeked.path and again.step == 6


def test_strict_false_tolerates_a_buffer_the_model_rebuilds(tmp_path):
    model, optimizer = parts()
    model.register_buffer("inv_freq", torch.ones(2))
    run = TrainingRun(tmp_path, max_steps=2)
    run.register(model, optimizer)
    run.resume()
    run.should_save(2)
    run.save(2)
    plain, _ = parts(seed=1)  # no inv_freq buffer
    strict = TrainingRun(tmp_path, max_steps=4)
    strict.register(plain)
    with pytest.raises(CheckpointError, match="unexpected \\['inv_freq'\\]"):
        strict.resume()
    lenient = TrainingRun(tmp_path, max_steps=4, strict=False)
    lenient.register(plain)
    assert lenient.resume().step == 2 and torch.equal(plain.weight, model.weight)


def test_recorded_differences_names_each_changed_key_and_refuses_an_unreadable_record(tmp_path):
    from biorecipes_shared import RunError, recorded_differences

    record = tmp_path / "fingerprint.json"
    record.write_text('{"kmer": 4, "genomes": 10}')
    assert recorded_differences(record, {"kmer": 4, "genomes": 10}) == ""
    assert recorded_differences(record, {"kmer": 5, "genomes": 10, "rc": True}) == (
        "kmer: checkpoint 4 vs now 5; rc: checkpoint None vs now True"
    )
    record.write_text("{not json")
    with pytest.raises(RunError, match="fingerprint.json: unreadable data fingerprint"):
        recorded_differences(record, {})
