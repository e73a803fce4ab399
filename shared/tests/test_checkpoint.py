import json
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from biorecipes_shared.checkpoint import (
    CheckpointError,
    export_safetensors,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def make_training(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        loss = model(torch.randn(3, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def test_round_trip_restores_everything(tmp_path):
    model, optimizer, scheduler = make_training()
    train_steps(model, optimizer, scheduler, 3)
    shuffle = torch.Generator().manual_seed(3)
    path = save_checkpoint(
        tmp_path,
        3,
        model,
        optimizer,
        scheduler,
        data_state={"epoch": 1, "order": torch.arange(5)},
        generators={"shuffle": shuffle},
        extra={"best": 0.5},
    )
    assert path.name == "step_00000003"
    expected = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=shuffle))

    model2, optimizer2, scheduler2 = make_training(seed=1)
    shuffle2 = torch.Generator().manual_seed(0)
    random.seed(0)
    state = load_checkpoint(path, model2, optimizer2, scheduler2, generators={"shuffle": shuffle2})
    assert state.step == 3 and state.extra == {"best": 0.5}
    assert state.data_state["epoch"] == 1 and torch.equal(state.data_state["order"], torch.arange(5))
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    got = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=shuffle2))
    assert got[:2] == expected[:2]
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])


def test_manifest_lists_every_file_with_hash(tmp_path):
    model, optimizer, _ = make_training()
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 1
    assert set(manifest["files"]) == {"model.safetensors", "training_state.pt", "rank_0.pt"}
    assert all(len(info["sha256"]) == 64 for info in manifest["files"].values())


def test_partial_save_is_never_picked(tmp_path):
    model, optimizer, _ = make_training()
    save_checkpoint(tmp_path, 5, model, optimizer)
    # A save that died mid-way: its temp dir (no manifest) and a step dir with data but no manifest.
    (tmp_path / ".tmp-step_00000009").mkdir()
    (tmp_path / ".tmp-step_00000009" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "step_00000008").mkdir()
    (tmp_path / "step_00000008" / "model.safetensors").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="step 8"):
        assert latest_checkpoint(tmp_path).name == "step_00000005"
    # The next successful save clears the dead temp dir.
    save_checkpoint(tmp_path, 10, model, optimizer, keep_last=5)
    assert not (tmp_path / ".tmp-step_00000009").exists()


def test_corrupt_manifest_is_skipped_with_warning(tmp_path):
    model, optimizer, _ = make_training()
    save_checkpoint(tmp_path, 1, model, optimizer, keep_last=3)
    newest = save_checkpoint(tmp_path, 2, model, optimizer, keep_last=3)
    (newest / "manifest.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable manifest"):
        assert latest_checkpoint(tmp_path).name == "step_00000001"
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        load_checkpoint(newest, model)


def test_corrupt_weights_raise_on_load(tmp_path):
    model, optimizer, _ = make_training()
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path, model, optimizer)


def test_truncated_file_found_by_size(tmp_path):
    model, optimizer, _ = make_training()
    path = save_checkpoint(tmp_path, 4, model, optimizer)
    state_file = path / "training_state.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="size"):
        assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="training_state.pt"):
        load_checkpoint(path, model, optimizer, check_hashes=False)


def test_weights_that_do_not_fit_are_an_error(tmp_path):
    model, optimizer, _ = make_training()
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path, nn.Sequential(nn.Linear(4, 8)))


def test_weights_of_another_shape_are_a_one_line_error_and_leave_the_model_alone(tmp_path):
    model, optimizer, _ = make_training()
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    wider = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"shape mismatches.*0\.weight \(8, 4\) vs model \(16, 4\)") as err:
        load_checkpoint(path, wider)
    assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())


def test_optimizer_state_that_does_not_fit_is_a_checkpoint_error(tmp_path):
    model, optimizer, _ = make_training()
    path = save_checkpoint(tmp_path, 1, model, optimizer)
    two_groups = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        load_checkpoint(path, model, two_groups)


def test_keep_last_k(tmp_path):
    model, optimizer, _ = make_training()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, optimizer, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_resave_same_step_replaces_it(tmp_path):
    model, optimizer, _ = make_training()
    save_checkpoint(tmp_path, 7, model, optimizer)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    path = save_checkpoint(tmp_path, 7, model, optimizer)
    assert torch.equal(load_file(path / "model.safetensors")["0.weight"], torch.ones(8, 4))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000007"]


def test_checkpoint_files_never_need_pickle(tmp_path):
    model, optimizer, scheduler = make_training()
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, data_state={"pos": 3})
    for name in ("training_state.pt", "rank_0.pt"):
        torch.load(path / name, weights_only=True)  # raises if anything but plain data was stored


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.decoder = nn.Linear(4, 10, bias=False)
        self.decoder.weight = self.embed.weight


def test_export_writes_tied_weights_and_config(tmp_path):
    model = TiedModel()
    out = export_safetensors(model, {"vocab_size": 10}, tmp_path / "final_model")
    weights = load_file(out / "model.safetensors")
    assert set(weights) == {"embed.weight", "decoder.weight"}
    assert torch.equal(weights["decoder.weight"], model.embed.weight)
    assert json.loads((out / "config.json").read_text()) == {"vocab_size": 10}
    export_safetensors(model, {"vocab_size": 11}, out)  # a second export replaces the first
    assert json.loads((out / "config.json").read_text()) == {"vocab_size": 11}
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_export_rejects_unknown_config_type(tmp_path):
    with warnings.catch_warnings(), pytest.raises(TypeError, match="config.json"):
        export_safetensors(TiedModel(), object(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_foreign_checkpoint_dir_becomes_valid_after_write_manifest_and_publish(tmp_path):
    from biorecipes_shared.checkpoint import publish, verify_checkpoint, write_manifest

    root = tmp_path / "checkpoints"
    tmp = root / ".tmp-step_00000007"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "trainer_state.json").write_text('{"global_step": 7}')
    (tmp / "sub" / "weights.bin").write_bytes(b"\x00" * 100)
    assert latest_checkpoint(root) is None  # a temp dir is never a candidate
    write_manifest(tmp, step=7, world_size=2)
    final = publish(tmp, root / "step_00000007")
    assert not tmp.exists() and latest_checkpoint(root) == final
    manifest = verify_checkpoint(final)
    assert manifest["step"] == 7 and manifest["world_size"] == 2
    assert set(manifest["files"]) == {"trainer_state.json", "sub/weights.bin"}
    (final / "sub" / "weights.bin").write_bytes(b"\x01" * 100)  # same size, other bytes: only the hash sees it
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(final)
