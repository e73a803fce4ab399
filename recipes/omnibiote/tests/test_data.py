"""Packed MLM batches from the bundled encoded sample: windows, record ids, masking, determinism, bad data."""

import json
import shutil

import numpy as np
import pytest
import torch

import data
from data import IGNORE_INDEX, PackedMLMBatcher, TokenSource, check_fingerprint, load_split, parse_source_weights
from errors import DataError


def test_window_inside_a_record_keeps_its_modality_token(sample_base_dir, sample_tokenizer):
    source = TokenSource(sample_base_dir / "train" / "uniprot")
    offsets = np.asarray(source.offsets)
    start = int(offsets[3]) + 5  # five tokens into record 3
    ids, records = source.window(start, 300)
    assert ids[0] == sample_tokenizer.modality_ids["protein"]
    assert np.array_equal(ids[1:], source.tokens[start + 1 : start + 300])
    boundaries = offsets[(offsets > start) & (offsets < start + 300)]
    assert np.array_equal(np.flatnonzero(np.diff(records)) + 1, boundaries - start)  # ids change at record starts
    assert records[0] == 0 and all(ids[b - start] == ids[0] for b in boundaries)  # each record starts <protein>


@pytest.mark.smoke
def test_batches_are_masked_mlm_batches(sample_base_dir, sample_tokenizer):
    sources = load_split(sample_base_dir, "train")
    batcher = PackedMLMBatcher(
        sources, {"genbank": 1.0, "uniprot": 1.0}, 128, 32, sample_tokenizer, torch.Generator().manual_seed(0)
    )
    batch = batcher.next_batch()
    ids, docs, labels = batch["input_ids"], batch["doc_ids"], batch["labels"]
    assert ids.shape == docs.shape == labels.shape == (32, 128)
    modality_ids = set(sample_tokenizer.modality_ids.values())
    assert set(ids[:, 0].tolist()) <= modality_ids and {
        sample_tokenizer.modality_ids[m] for m in ("dna", "protein")
    } <= set(ids[:, 0].tolist())
    assert (docs[:, 1:] >= docs[:, :-1]).all() and (docs[:, 0] == 0).all()
    masked = labels != IGNORE_INDEX
    assert (ids[masked] == sample_tokenizer.mask_id).all()
    assert not torch.isin(labels[masked], torch.tensor(sample_tokenizer.special_ids)).any()
    assert 0.12 < masked.float().mean() < 0.18  # 15% of (almost all) tokens
    assert not (ids == sample_tokenizer.mask_id)[~masked].any()


def test_same_generator_state_gives_same_batches(sample_base_dir, sample_tokenizer):
    sources = load_split(sample_base_dir, "train")
    weights = parse_source_weights("genbank=0.8,uniprot=0.2", sources)
    generator = torch.Generator().manual_seed(7)
    batcher = PackedMLMBatcher(sources, weights, 64, 4, sample_tokenizer, generator)
    batcher.next_batch()
    saved = generator.get_state()
    expected = batcher.next_batch()
    generator.set_state(saved)
    again = batcher.next_batch()
    assert all(torch.equal(expected[k], again[k]) for k in expected)
    other = PackedMLMBatcher(sources, weights, 64, 4, sample_tokenizer, torch.Generator().manual_seed(8)).next_batch()
    assert not torch.equal(other["input_ids"], expected["input_ids"])


def test_source_shorter_than_ctx_len_is_padded(sample_base_dir, sample_tokenizer):
    sources = load_split(sample_base_dir, "val")
    n = sources["genbank"].n_tokens
    batch = PackedMLMBatcher(
        sources, {"genbank": 1.0}, n + 50, 2, sample_tokenizer, torch.Generator().manual_seed(0)
    ).next_batch()
    assert (batch["input_ids"][:, n:] == sample_tokenizer.pad_id).all() and (batch["doc_ids"][:, n:] == -1).all()
    assert (batch["labels"][:, n:] == IGNORE_INDEX).all()


def test_source_weights_parsing(sample_base_dir):
    sources = load_split(sample_base_dir, "train")
    assert parse_source_weights("genbank=0.8,uniprot=0.2", sources) == {"genbank": 0.8, "uniprot": 0.2}
    proportional = parse_source_weights(None, sources)
    assert proportional["uniprot"] == sources["uniprot"].n_tokens
    for bad, message in [("refseq=1", "sources are"), ("genbank=x", "name=number"), ("genbank=0", "positive")]:
        with pytest.raises(DataError, match=message):
            parse_source_weights(bad, sources)


def test_missing_split_and_broken_data_are_data_errors(tmp_path, sample_base_dir):
    with pytest.raises(DataError, match="no encoded data"):
        load_split(tmp_path, "train")
    copy = tmp_path / "copy"
    shutil.copytree(sample_base_dir, copy)
    tokens = copy / "train" / "genbank" / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-10])
    with pytest.raises(DataError, match="sizes disagree"):
        load_split(copy, "train")
    shutil.copytree(sample_base_dir / "train", copy / "train", dirs_exist_ok=True)
    meta_path = copy / "train" / "genbank" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, tokenizer_sha256="0" * 64)))
    with pytest.raises(DataError, match="different tokenizers"):
        load_split(copy, "train")


def _copy_source(sample_base_dir, tmp_path, **changes):
    """The sample's val/uniprot source copied to tmp_path, with meta.json `changes` (None deletes a key)."""
    folder = tmp_path / "val" / "uniprot"
    shutil.copytree(sample_base_dir / "val" / "uniprot", folder)
    meta = json.loads((folder / "meta.json").read_text())
    for key, value in changes.items():
        meta.pop(key) if value is None else meta.__setitem__(key, value)
    (folder / "meta.json").write_text(json.dumps(meta))
    return TokenSource(folder)


def test_bundled_data_matches_its_tokenizer(sample_base_dir, sample_tokenizer):
    check_fingerprint([*load_split(sample_base_dir, "train").values()], sample_tokenizer)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"tokenizer_sha256": "ab" * 32}, "encoded with tokenizer sha256 abababababab…, but "),
        ({"vocab_size": 1024}, "encoded with 1024 pieces"),
        ({"special_ids": {"pad": 0, "unk": 1, "eos": 2, "mask": 9}}, "special ids"),
        ({"format_version": 7}, "format_version 7 is newer"),
    ],
)
def test_fingerprint_mismatch_is_one_line_naming_both_files(
    sample_base_dir, sample_tokenizer, tmp_path, changes, message
):
    source = _copy_source(sample_base_dir, tmp_path, **changes)
    with pytest.raises(DataError, match=message) as err:
        check_fingerprint([source], sample_tokenizer)
    text = str(err.value)
    assert str(source.folder / "meta.json") in text and str(sample_tokenizer.model_file) in text and "\n" not in text


def test_older_data_without_fingerprint_only_warns(sample_base_dir, sample_tokenizer, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(data.log, "propagate", True)  # the trainer's logger set-up turns it off; caplog needs it
    source = _copy_source(sample_base_dir, tmp_path, format_version=None, special_ids=None, tokenizer_sha256=None)
    with caplog.at_level("WARNING", logger="omnibiote"):
        check_fingerprint([source], sample_tokenizer)
    assert "records no tokenizer" in caplog.text and "format 1" in caplog.text
