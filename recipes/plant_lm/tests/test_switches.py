"""The two execution switches, `--compile` and `--activation_checkpointing`: same results as without, checkpoints
interchangeable, and what activation checkpointing saves."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest
import torch
from conftest import assert_same_weights, tiny_config
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

import model as model_module
import train as train_module
from biorecipes_shared import ThroughputMeter
from model import PlantLM
from train import train


def tiny_model(dropout: float) -> PlantLM:
    torch.manual_seed(0)
    return PlantLM(3, d_model=32, n_heads=4, n_layers=2, dropout=dropout, local_attn_window=8, max_positions=16)


def train_steps(model: PlantLM, steps: int, accumulation: int = 2) -> tuple[list[float], list[torch.Tensor]]:
    """`steps` optimizer steps on fixed random windows, as train_step does them (memory staged, committed after
    the step); returns the losses and the gradients of the last step."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(2)  # dropout stream
    losses, grads = [], []
    for _ in range(steps):
        for _ in range(accumulation):
            ids = torch.randint(0, 4096, (4, 17), generator=generator)
            species = torch.randint(0, 3, (4,), generator=generator)
            out = model(ids[:, :-1], species, ids[:, 1:], memory_write_len=8)
            (out["loss"] / accumulation).backward()
            losses.append(out["loss"].item())
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.memory.commit(global_context=500, normalize_every=2)
    return losses, grads


def test_activation_checkpointing_gives_identical_losses_gradients_and_bucket_memory():
    """With dropout on: the recompute replays the saved RNG state, and the memory is staged once per forward."""
    plain, checkpointed = tiny_model(0.1), tiny_model(0.1)
    checkpointed.activation_checkpointing = True
    losses_plain, grads_plain = train_steps(plain, 3)
    losses_checkpointed, grads_checkpointed = train_steps(checkpointed, 3)
    assert losses_checkpointed == losses_plain
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_checkpointed))
    state_plain, state_checkpointed = plain.state_dict(), checkpointed.state_dict()
    assert all(torch.equal(state_plain[k], state_checkpointed[k]) for k in state_plain)
    assert int(checkpointed.memory.commits) == 3 and float(checkpointed.memory.counts.sum()) > 0


def saved_activation_bytes(n_layers: int, activation_checkpointing: bool) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward of a tiny model: the
    activation memory a step holds at its peak (the memory-bucket tensor, shared by every block, counts once)."""
    torch.manual_seed(0)
    model = PlantLM(3, d_model=32, n_heads=4, n_layers=n_layers, dropout=0.1, local_attn_window=8, max_positions=16)
    model.activation_checkpointing = activation_checkpointing
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 4096, (8, 17), generator=torch.Generator().manual_seed(3))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids[:, :-1], torch.zeros(8, dtype=torch.long), ids[:, 1:])["loss"].backward()
    return sum(storages.values())


def test_activation_checkpointing_keeps_only_block_inputs_for_backward():
    """What each extra block adds to the saved activations: all its intermediates without the switch, little more
    than its input with it (the logits and loss outside the blocks are kept either way)."""
    per_block = {ac: (saved_activation_bytes(4, ac) - saved_activation_bytes(2, ac)) / 2 for ac in (False, True)}
    assert per_block[True] < 0.1 * per_block[False]


@contextlib.contextmanager
def stop_after_step(monkeypatch, step: int):
    """A real SIGUSR1 (as SLURM sends) right after `step` is logged: the run saves there and stops."""
    original = train_module.log_step

    def log_then_signal(run, state, *args):
        original(run, state, *args)
        if state.step == step:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(train_module, "log_step", log_then_signal)
    yield
    monkeypatch.setattr(train_module, "log_step", original)


@pytest.mark.slow  # torch.compile of the block, forward and backward: ~1 min on a loaded 2-core CPU
def test_compile_matches_eager_and_runs_resume_across_compile_on_and_off(data_dir, tmp_path, monkeypatch):
    eager, compiled = tiny_model(0.0), tiny_model(0.0)
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # compiled in place: the same keys
    losses_eager, _ = train_steps(eager, 10, accumulation=1)
    losses_compiled, _ = train_steps(compiled, 10, accumulation=1)
    assert losses_compiled == pytest.approx(losses_eager, rel=1e-4)

    # Checkpoints of either mode resume in the other: eager -> compiled -> eager, each part stopped by a real
    # SIGUSR1, equals eager throughout (the compiled graphs are reused from above: same shapes).
    config = dict(dropout=0.0, n_epochs=3, steps_per_epoch=2)
    straight = train(tiny_config(data_dir, tmp_path / "straight", **config))
    mixed = tmp_path / "mixed"
    with stop_after_step(monkeypatch, 2):
        first = train(tiny_config(data_dir, mixed, **config))
    with stop_after_step(monkeypatch, 4):
        second = train(tiny_config(data_dir, mixed, compile=True, **config))
    third = train(tiny_config(data_dir, mixed, **config))
    assert [len(first["losses"]), len(second["losses"]), len(third["losses"])] == [2, 2, 2]
    assert first["losses"] + second["losses"] + third["losses"] == pytest.approx(straight["losses"], rel=1e-4)
    final = "checkpoints/step_00000006/model.safetensors"  # weights and bucket memory
    reference, resumed = load_file(tmp_path / "straight" / final), load_file(mixed / final)
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=1e-4, atol=1e-6)


def test_training_with_activation_checkpointing_is_the_same_run_and_logs_real_tokens(data_dir, tmp_path, monkeypatch):
    """Through train.py: the flag reaches the model, dropout included the run is identical (weights, bucket memory,
    losses), and every metrics.jsonl training line carries tokens_per_s and useful_token_fraction counted from the
    batches (windows are whole: no padding, fraction 1)."""
    updates = []

    update = ThroughputMeter.update

    def recording_update(self, samples=0, tokens=0, positions=None):
        updates.append((samples, tokens, positions))
        update(self, samples, tokens, positions)

    monkeypatch.setattr(ThroughputMeter, "update", recording_update)
    recomputed_blocks = []

    def counting_checkpoint(function, *args, **kwargs):
        recomputed_blocks.append(kwargs["use_reentrant"])
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", counting_checkpoint)
    config = dict(n_epochs=1, steps_per_epoch=2)  # dropout 0.1, batch 4, accumulation 2, context 16
    plain = train(tiny_config(data_dir, tmp_path / "plain", **config))
    checkpointed = train(tiny_config(data_dir, tmp_path / "ac", activation_checkpointing=True, **config))
    assert checkpointed["losses"] == plain["losses"]
    assert recomputed_blocks == [False] * (2 * 2)  # 1 block x 2 micro-batches x 2 steps, only with the flag
    final = "final_model/model.safetensors"
    assert_same_weights(tmp_path / "plain" / final, tmp_path / "ac" / final)  # incl. memory.sums/counts/commits
    assert updates == [(8, 4 * 2 * 16, 4 * 2 * 16)] * 4  # per process: batch x accumulation x context tokens
    lines = [json.loads(line) for line in (tmp_path / "ac" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(line["tokens_per_s"] > 0 and line["useful_token_fraction"] == 1.0 for line in lines)
