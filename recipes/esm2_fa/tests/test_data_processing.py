"""Preprocessing: chunking, BOS/EOS rules, token budget, batch-major rows, refined FASTA, bad input."""

import gzip
import hashlib
import json

import numpy as np
import pytest
from conftest import SAMPLE_TRAIN, TINY_CONFIG, head_fasta, shared_data_dir, write_fasta
from datasets import load_from_disk

import fasta_reader
from data_processing import (
    PACKING_FILE,
    FastaError,
    chunk_protein,
    main,
    pack_batches,
    preprocess_fasta,
    read_fasta,
    tokenize,
)
from model import CLS_ID, EOS_ID, ESM_VOCAB, PAD_ID, save_tokenizer

OPTS = dict(chunk_size=50, shard_size=40, max_aa_length=100, token_budget=512, max_position_embeddings=1026)


def load_rows(out_dir):
    shards = sorted(out_dir.glob("shard-*"))
    return [row for shard in shards for row in load_from_disk(str(shard))], shards


def test_chunks_are_balanced_with_range_ids_and_bos_eos_only_at_the_ends():
    seq = "".join(np.random.default_rng(0).choice(list("ACDEFGHIKLMNPQRSTVWY"), 2500))
    chunks = chunk_protein(">P1 some protein", seq, 1022)
    assert [len(c.residues) for c in chunks] == [834, 833, 833]
    assert [c.id for c in chunks] == [
        ">P1/1-834 some protein",
        ">P1/835-1667 some protein",
        ">P1/1668-2500 some protein",
    ]
    assert "".join(c.residues for c in chunks) == seq
    assert [(c.bos, c.eos) for c in chunks] == [(True, False), (False, False), (False, True)]
    first, middle, last = (tokenize(c) for c in chunks)
    assert first[0] == CLS_ID and first[-1] != EOS_ID and len(first) == 835
    assert CLS_ID not in middle and EOS_ID not in middle and len(middle) == 833
    assert last[0] != CLS_ID and last[-1] == EOS_ID
    assert chunk_protein(">P2", seq[:1022], 1022)[0].id == ">P2"  # exactly max length: one piece, no suffix


def test_tokenize_matches_the_esm_vocabulary_and_transformers_tokenizer(tmp_path):
    chunk = chunk_protein(">x", "MKLVXU", 10)[0]
    assert [ESM_VOCAB[i] for i in tokenize(chunk)] == ["<cls>", "M", "K", "L", "V", "X", "U", "<eos>"]
    tokenizer = save_tokenizer(tmp_path)
    for header, residues in read_fasta(SAMPLE_TRAIN):
        if len(residues) <= 1022:
            assert tokenize(chunk_protein(header, residues, 1022)[0]).tolist() == tokenizer(residues)["input_ids"]


def test_pack_batches_never_exceeds_budget_and_sorts_within_batches():
    lengths = list(np.random.default_rng(1).integers(10, 300, 500))
    batches = pack_batches(lengths, 1000)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 1000


@pytest.mark.smoke
def test_shards_rows_batch_major_under_budget_and_refined_fasta(tmp_path):
    fasta = head_fasta(SAMPLE_TRAIN, tmp_path / "in.fasta", 120)
    summary = preprocess_fasta(fasta, tmp_path / "out", progress=False, **OPTS)
    rows, shards = load_rows(tmp_path / "out")
    assert len(shards) == summary["shards"] > 1 and len(rows) == summary["sequences"]
    by_batch = {}
    for shard in shards:
        # batch-major, numbered within the shard: 0, 0, 1, 1, 1, 2, ...
        batch_ids = [row["batch_id"] for row in load_from_disk(str(shard))]
        assert batch_ids[0] == 0 and all(b - a in (0, 1) for a, b in zip(batch_ids, batch_ids[1:]))
        for row in load_from_disk(str(shard)):
            by_batch.setdefault((shard.name, row["batch_id"]), []).append(row)
    for row in rows:
        n = row["sequence_length"]
        assert row["attention_mask"] == [1] * n + [0] * (len(row["input_ids"]) - n)
        assert row["input_ids"][n:] == [PAD_ID] * (len(row["input_ids"]) - n)
        assert row["labels"][:n] == row["input_ids"][:n] and set(row["labels"][n:]) <= {-100}
        assert row["id"].startswith(">")
    for batch in by_batch.values():
        width = len(batch[0]["input_ids"])
        assert all(len(r["input_ids"]) == width for r in batch)
        assert width == max(r["sequence_length"] for r in batch)
        assert len(batch) * width <= OPTS["token_budget"]
    refined = list(read_fasta(tmp_path / "in_refined.fasta"))
    assert [h for h, _ in refined] == sorted({r["id"] for r in rows}, key=[h for h, _ in refined].index)
    assert len(refined) == len(rows)
    assert any("/1-" in h for h, _ in refined)  # the sample has proteins longer than 100 residues


def test_gzip_input_gives_the_same_shards(tmp_path):
    plain = head_fasta(SAMPLE_TRAIN, tmp_path / "a.fasta", 30)
    gz = tmp_path / "b.fasta.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    preprocess_fasta(plain, tmp_path / "plain", progress=False, **OPTS)
    preprocess_fasta(gz, tmp_path / "gz", progress=False, **OPTS)
    assert load_rows(tmp_path / "plain")[0] == load_rows(tmp_path / "gz")[0]
    assert (tmp_path / "b_refined.fasta").read_text() == (tmp_path / "a_refined.fasta").read_text()


def test_lowercase_crlf_and_trailing_stop_are_normalised(tmp_path):
    path = tmp_path / "x.fasta"
    path.write_bytes(b">p1 desc\r\nmkl\r\nVA*\r\n>p2\r\nGG\r\n")
    assert list(read_fasta(path)) == [(">p1 desc", "MKLVA"), (">p2", "GG")]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "no records (empty file)"),
        (b"\n\n", "no records (empty file)"),
        (b"MKV\n>p\nMK\n", "text before the first '>'"),
        (b">only_header\n", "record 1 (>only_header): empty record"),
        (b">a\nMK\n>b\n>c\nMK\n", "record 2 (>b): empty record"),
        (b">a\nMK\n>b\nMK\xc3\x9fV\n", "record 2 (>b): invalid residue '\u00df' at position 3"),
        (b">a\nMK\n>b\xff\nMK\n", "not UTF-8"),
        (b">a\nMK\n>b\nMK1V\n", "record 2 (>b): invalid residue '1' at position 3"),
        (b">a\nMK*V\n", "record 1 (>a): stop codon '*' inside the sequence at position 3"),
        (b">a\nMK-V\n", "invalid residue '-'"),
    ],
)
def test_bad_fasta_raises_one_clear_error_and_leaves_nothing(tmp_path, content, message):
    path = tmp_path / "bad.fasta"
    path.write_bytes(content)
    with pytest.raises(FastaError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")) as err:
        preprocess_fasta(path, tmp_path / "out", progress=False, **OPTS)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fasta"]  # no shards, no partial dirs, no refined


def test_failed_run_leaves_no_folder_it_created(tmp_path):
    bad = tmp_path / "bad.fasta"
    bad.write_text(">a\nMK9\n")
    with pytest.raises(FastaError, match="invalid residue '9'"):
        preprocess_fasta(bad, tmp_path / "new" / "deeper" / "out", progress=False, **OPTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fasta"]


def test_truncated_gzip_is_an_error_without_partial_output(tmp_path):
    data = gzip.compress(head_fasta(SAMPLE_TRAIN, tmp_path / "src.fasta", 200).read_bytes())
    path = tmp_path / "cut.fasta.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FastaError, match="truncated or corrupt gzip"):
        preprocess_fasta(path, tmp_path / "out", progress=False, **OPTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.fasta.gz", "src.fasta"]


def test_max_aa_length_beyond_positions_and_nonempty_output_are_refused(tmp_path):
    fasta = write_fasta(tmp_path / "ok.fasta", [("a", "MKV")])
    with pytest.raises(FastaError, match="exceeds the model's max_position_embeddings"):
        preprocess_fasta(fasta, tmp_path / "out", **{**OPTS, "max_aa_length": 1025, "token_budget": 4096})
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("user data")
    with pytest.raises(FastaError, match="not empty"):
        preprocess_fasta(fasta, tmp_path / "used", **OPTS)
    assert (tmp_path / "used" / "keep.txt").read_text() == "user data"


def test_cli_prints_one_error_line_and_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.fasta"
    bad.write_text(">a\nMK9\n")
    args = ["--input_fasta", str(bad), "--output_dir", str(tmp_path / "o"), "--config", str(TINY_CONFIG)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()  # tqdm's progress line may come first
    assert err[-1].startswith("error: ") and "record 1" in err[-1] and "Traceback" not in "".join(err)
    assert main([*args, "--max_aa_length", "2000"]) == 1
    assert "max_position_embeddings" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_one_error_line_and_leaves_nothing(tmp_path, capsys):
    fasta = write_fasta(tmp_path / "ok.fasta", [("a", "MKV")])
    taken = tmp_path / "taken"
    taken.write_text("user data")
    for out in (taken, taken / "sub"):
        args = ["--input_fasta", str(fasta), "--output_dir", str(out), "--config", str(TINY_CONFIG)]
        assert main(args) == 1
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert lines[-1].startswith("error: ") and "is not a directory" in lines[-1] and "Traceback" not in err
    assert taken.read_text() == "user data" and sorted(p.name for p in tmp_path.iterdir()) == ["ok.fasta", "taken"]


def test_shards_record_their_packing_next_to_them(tmp_path):
    fasta = head_fasta(SAMPLE_TRAIN, tmp_path / "in.fasta", 20)
    preprocess_fasta(fasta, tmp_path / "out", progress=False, **OPTS)
    packing = json.loads((tmp_path / "out" / PACKING_FILE).read_text())
    expected = {"token_budget": 512, "max_aa_length": 100, "max_position_embeddings": 1026, "format_version": 2}
    assert {k: packing[k] for k in expected} == expected
    assert packing["vocab_sha256"] == hashlib.sha256(("\n".join(ESM_VOCAB) + "\n").encode()).hexdigest()
    assert packing["special_ids"] == {"cls": CLS_ID, "pad": PAD_ID, "eos": EOS_ID, "unk": 3, "mask": 32}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.fasta", "in_refined.fasta", "out"]  # no temp left


def test_real_uniref_lengths_pack_at_least_97_percent_full():
    """Default window (10,000 sequences) and budget (16,384 tokens) on 10,000 real UniRef lengths."""
    data = shared_data_dir()
    if data is None or not (data / "uniref_10k" / "train.parquet").is_file():
        pytest.skip("../shared/data/uniref_10k not present (developer-only real-length data)")
    import pyarrow.parquet as pq

    sequences = pq.read_table(data / "uniref_10k" / "train.parquet", columns=["sequence"])["sequence"].to_pylist()
    lengths = [len(tokenize(c)) for i, s in enumerate(sequences) for c in chunk_protein(f">{i}", s, 1022)]
    real = padded = 0
    for start in range(0, len(lengths), 10_000):
        window = lengths[start : start + 10_000]
        for batch in pack_batches(window, 16384):
            assert len(batch) * max(window[i] for i in batch) <= 16384
            real += sum(window[i] for i in batch)
            padded += len(batch) * max(window[i] for i in batch)
    assert real / padded >= 0.97


def test_utf8_headers_reach_the_shards_and_the_refined_fasta(tmp_path):
    fasta = tmp_path / "u.fasta"
    fasta.write_bytes(">p1 Ångström µ-7\nMKV\n>p2\nMKLV\n".encode())
    preprocess_fasta(fasta, tmp_path / "out", progress=False, **OPTS)
    rows, _ = load_rows(tmp_path / "out")
    assert ">p1 Ångström µ-7" in {r["id"] for r in rows}
    assert (tmp_path / "u_refined.fasta").read_text(encoding="utf-8") == ">p1 Ångström µ-7\nMKV\n>p2\nMKLV\n"


def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_processes_write_byte_identical_output(tmp_path):
    fasta = head_fasta(SAMPLE_TRAIN, tmp_path / "in.fasta", 400)
    opts = {**OPTS, "chunk_size": 37, "shard_size": 90}  # many windows, shards that span windows
    outputs = {}
    for num_proc in (1, 2):
        preprocess_fasta(fasta, tmp_path / f"out{num_proc}", progress=False, num_proc=num_proc, **opts)
        outputs[num_proc] = (tree_bytes(tmp_path / f"out{num_proc}"), (tmp_path / "in_refined.fasta").read_bytes())
    assert outputs[1] == outputs[2] and len(outputs[1][0]) > 5


@pytest.mark.slow
@pytest.mark.parametrize("num_proc", [1, 2])
def test_first_bad_record_is_reported_at_any_process_count(tmp_path, num_proc, monkeypatch):
    monkeypatch.setattr(fasta_reader, "_READ_SIZE", 4096)  # read in small steps, so the cut is found late
    good = head_fasta(SAMPLE_TRAIN, tmp_path / "g.fasta", 200).read_bytes()
    path = tmp_path / "bad.fasta.gz"
    # a bad record in the 3rd window, then the gzip stream is cut: the record is reported, as in one process
    path.write_bytes(gzip.compress(good + b">bad1\nMK7\n" + good)[:-300])
    with pytest.raises(FastaError, match=r"record 201 \(>bad1\): invalid residue '7'"):
        preprocess_fasta(path, tmp_path / "out", progress=False, num_proc=num_proc, **{**OPTS, "chunk_size": 90})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fasta.gz", "g.fasta"]


def test_spans_of_a_plain_file_hold_the_same_blocks_as_the_bytes(tmp_path):
    """Workers read their own blocks of an uncompressed input (Span); the blocks must be the bytes the reader cuts."""
    body = head_fasta(SAMPLE_TRAIN, tmp_path / "in.fasta", 60).read_bytes()
    plain = tmp_path / "lead.fasta"
    plain.write_bytes(b"\n\n  \n" + body)  # leading blank lines move the first block's start
    blocks = list(fasta_reader.record_blocks(plain, 7))
    spans = list(fasta_reader.record_blocks(plain, 7, spans=True))
    assert [first for first, _ in spans] == [first for first, _ in blocks] and len(blocks) == 9
    assert all(isinstance(span, fasta_reader.Span) for _, span in spans)
    assert [fasta_reader.read_span(plain, span) for _, span in spans] == [block for _, block in blocks]
    packed = tmp_path / "lead.fasta.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert list(fasta_reader.record_blocks(packed, 7, spans=True)) == blocks  # gzip: always the bytes
