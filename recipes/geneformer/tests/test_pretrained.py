"""model.init_from: a Hugging Face BertForMaskedLM folder (safetensors or pytorch_model.bin) as the starting point."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLE_DIR, published_folder, tiny_overrides
from safetensors.torch import load_file

import train

VOCAB = (SAMPLE_DIR / "vocab.txt").read_text().splitlines()


def folder_weights(folder):
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    return torch.load(folder / "pytorch_model.bin", weights_only=True)


def overrides(run_dir, folder, **extra):
    values = {"model.init_from": str(folder), "training.learning_rate": 0, "training.save_every": 1}
    return [o for o in tiny_overrides(run_dir, steps=1, **{**values, **extra}) if "intermediate_size" not in o]


@pytest.mark.parametrize("safe", [True, False])
def test_a_frozen_one_step_run_exports_the_published_weights_bitwise(tmp_path, safe):
    folder = published_folder(tmp_path / "published", safe=safe)
    assert train.main(overrides(tmp_path / "run", folder)) == 0
    exported = load_file(tmp_path / "run" / "final_model" / "model.safetensors")
    theirs = folder_weights(folder)
    assert set(theirs) <= set(exported)
    assert all(torch.equal(exported[name], tensor) for name, tensor in theirs.items())
    config = json.loads((tmp_path / "run" / "final_model" / "config.json").read_text())
    assert (config["intermediate_size"], config["max_position_embeddings"], config["vocab_size"]) == (48, 64, 767)


@pytest.mark.parametrize(
    ("change", "extra", "message"),
    [
        (
            {},
            {"model.hidden_size": 64},
            "error: model.hidden_size=64 conflicts with {folder}/config.json (hidden_size=32)",
        ),
        ({"vocab_size": 800}, {}, "error: {folder}/config.json has vocab_size=800 but sample_data/vocab.txt has 767"),
        ({"max_position_embeddings": 32}, {}, "error: data.max_seq_length=64 > model.max_position_embeddings"),
    ],
)
def test_a_folder_that_does_not_fit_is_one_line_before_any_output(tmp_path, capsys, change, extra, message):
    folder = published_folder(tmp_path / "published", **change)
    assert train.main(overrides(tmp_path / "run", folder, **extra)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message.format(folder=folder)), err
    assert not (tmp_path / "run").exists()


def test_another_vocabulary_of_the_same_size_is_refused(tmp_path, capsys):
    folder = published_folder(tmp_path / "published")
    swapped = VOCAB[:5] + [VOCAB[6], VOCAB[5]] + VOCAB[7:]
    (folder / "vocab.txt").write_text("\n".join(swapped) + "\n")
    assert train.main(overrides(tmp_path / "run", folder)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {folder / 'vocab.txt'} and sample_data/vocab.txt differ first at token id 5 "
        f"({VOCAB[6]!r} vs {VOCAB[5]!r}): tokenize the data with the published model's vocabulary"
    ]
    assert not (tmp_path / "run").exists()


def test_a_folder_without_weights_or_config_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert train.main(overrides(tmp_path / "run", tmp_path / "empty")) == 1
    assert "no config.json (expected a Hugging Face BertForMaskedLM folder)" in capsys.readouterr().err
    folder = published_folder(tmp_path / "published")
    (folder / "model.safetensors").unlink()
    assert train.main(overrides(tmp_path / "run", folder)) == 1
    assert capsys.readouterr().err.strip() == f"error: {folder}: no model.safetensors or pytorch_model.bin"
