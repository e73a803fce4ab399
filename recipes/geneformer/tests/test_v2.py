"""Geneformer V2 layout: the v2_104m / v2_316m configs, the V2 sample, and starting from a V2 folder."""

from __future__ import annotations

import math
from dataclasses import asdict

import pyarrow.parquet as pq
import pytest
import torch
import transformers
from conftest import SAMPLE_DIR, published_folder, tiny_overrides
from safetensors.torch import load_file

import train
from config import load_config, validate
from model import BertForMaskedLM, geneformer_config

V2_DIR = SAMPLE_DIR / "v2"
V2_VOCAB = (V2_DIR / "vocab.txt").read_text().splitlines()
UPSTREAM_V2_VOCAB = 20_275  # tokens of the published V2 token dictionary


@pytest.mark.parametrize(
    ("name", "sizes", "millions"),
    [("v2_104m", (12, 768, 12, 3072), 104.4), ("v2_316m", (18, 1152, 18, 4608), 316.4)],
)
def test_v2_configs_have_the_upstream_sizes(name, sizes, millions):
    cfg = load_config(name)
    model = cfg.model
    assert (model.num_hidden_layers, model.hidden_size, model.num_attention_heads, model.intermediate_size) == sizes
    assert (model.hidden_act, model.max_position_embeddings, cfg.data.max_seq_length) == ("gelu", 4096, 4096)
    validate(cfg)
    kwargs = {k: v for k, v in asdict(model).items() if k not in ("vocab_size", "init_from")}
    with torch.device("meta"):  # sizes only: no memory
        built = BertForMaskedLM(geneformer_config(UPSTREAM_V2_VOCAB, **kwargs))
    assert sum(p.numel() for p in built.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_the_v2_sample_wraps_every_cell_in_cls_and_eos():
    assert V2_VOCAB[:4] == ["<pad>", "<mask>", "<cls>", "<eos>"]
    assert V2_VOCAB[4:] == (SAMPLE_DIR / "vocab.txt").read_text().splitlines()[2:]  # same genes as the V1 sample
    cells = pq.read_table(V2_DIR / "cells.parquet").column("input_ids").to_pylist()
    assert len(cells) == 500 and max(map(len, cells)) <= load_config("l0_sanity_v2").data.max_seq_length
    assert all(cell[0] == 2 and cell[-1] == 3 and min(cell[1:-1]) >= 4 for cell in cells)


def v2_folder(path):
    """A tiny V2-layout BertForMaskedLM (GELU, 4,096 positions, the V2 sample vocabulary) saved by transformers."""
    return published_folder(
        path, vocab_file=V2_DIR / "vocab.txt", seed=5, max_position_embeddings=4096, hidden_act="gelu"
    )


@pytest.mark.slow
def test_init_from_a_v2_folder_round_trips_through_transformers(tmp_path):
    """l0_sanity_v2 from a V2 folder at lr 0: the export loads in transformers and equals what was loaded."""
    folder = v2_folder(tmp_path / "published")
    extra = {"model.init_from": str(folder), "training.learning_rate": 0}
    overrides = [o for o in tiny_overrides(tmp_path / "run", steps=1, **extra) if "intermediate_size" not in o]
    assert train.main(["--config-name", "l0_sanity_v2", *overrides]) == 0
    final = tmp_path / "run" / "final_model"
    exported, published = load_file(final / "model.safetensors"), load_file(folder / "model.safetensors")
    assert set(published) <= set(exported)
    assert all(torch.equal(exported[name], tensor) for name, tensor in published.items())
    theirs = transformers.BertForMaskedLM.from_pretrained(folder).eval()
    reloaded = transformers.BertForMaskedLM.from_pretrained(final).eval()
    assert (reloaded.config.hidden_act, reloaded.config.max_position_embeddings) == ("gelu", 4096)
    input_ids = torch.tensor([[2, *range(4, 40), 3]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, theirs(input_ids=input_ids).logits)
    assert (final / "vocab.txt").read_text().splitlines() == V2_VOCAB


@pytest.mark.slow
def test_l0_sanity_v2_trains_on_the_v2_sample(tmp_path):
    losses = train.train(load_config("l0_sanity_v2", tiny_overrides(tmp_path, steps=3)))
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    model = transformers.BertForMaskedLM.from_pretrained(tmp_path / "final_model")
    assert model.config.vocab_size == len(V2_VOCAB) == 769 and model.config.hidden_act == "gelu"
