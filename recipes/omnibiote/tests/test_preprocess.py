"""GenBank/UniProt preprocessing of the bundled real files, RNA handling, encoding, and the bad inputs."""

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from Bio import SeqIO
from Bio.Seq import Seq
from Bio.SeqFeature import SeqFeature, SimpleLocation
from Bio.SeqRecord import SeqRecord

from data import TokenSource
from errors import PreprocessError, run_cli
from preprocessing import parallel
from preprocessing.encode_shards import encode_shards, is_val_record
from preprocessing.preprocess_genbank import main as main_genbank
from preprocessing.preprocess_genbank import preprocess_genbank, split_at_ambiguous_runs
from preprocessing.preprocess_uniprot import preprocess_uniprot
from preprocessing.shards import iter_shard_records


def genbank_text(path) -> str:
    return gzip.decompress(path.read_bytes()).decode()


def test_bundled_genbank_record_is_parsed_as_dna(tmp_path, sample_genbank):
    writer = preprocess_genbank([sample_genbank], tmp_path)
    records = list(iter_shard_records(writer.shard_paths))
    assert len(records) == 1
    modality, record_id, sequence = records[0]
    assert (modality, record_id, len(sequence)) == ("dna", "BGC0001090.1", 44660)  # LOCUS says 44660 bp
    assert sequence.startswith("TGCCTTTAAC") and set(sequence) <= set("ACGTN")
    windows = preprocess_genbank([sample_genbank], tmp_path / "windows", split_length=2000)
    pieces = list(iter_shard_records(windows.shard_paths))
    assert "".join(seq for _, _, seq in pieces) == sequence and pieces[1][1] == "BGC0001090.1/1"


def test_rna_record_keeps_its_molecule_type_and_uses_u(tmp_path):
    record = SeqRecord(
        Seq("atgGCTtttNNNNNNNNNNNNaaacccgggtttACGTAGCTAGCTAGCTAGCTGATCGATCGA"), id="MRNA1.1", name="MRNA1"
    )
    record.annotations["molecule_type"] = "mRNA"
    record.features.append(SeqFeature(SimpleLocation(0, len(record)), type="source", qualifiers={"mol_type": ["mRNA"]}))
    path = tmp_path / "rna.gbk"
    SeqIO.write([record], path, "genbank")
    writer = preprocess_genbank([path], tmp_path / "out", max_ambiguous_run=10, min_length=8)
    records = list(iter_shard_records(writer.shard_paths))
    assert [(m, rid) for m, rid, _ in records] == [("rna", "MRNA1.1/0"), ("rna", "MRNA1.1/1")]
    assert records[0][2] == "AUGGCUUUU"  # upper-cased, T -> U, cut at the run of 12 N
    assert "T" not in records[1][2] and records[1][2].startswith("AAACCCGGGUUUACGUAG")


def test_ambiguous_runs_split_and_short_pieces_dropped():
    sequence = "ACGT" * 10 + "N" * 10 + "ACG" + "N" * 12 + "TTTT" * 10 + "RY" + "GGGG" * 10
    pieces = split_at_ambiguous_runs(sequence, "dna", max_run=10, min_length=20, split_length=0)
    assert pieces == ["ACGT" * 10, "TTTT" * 10 + "RY" + "GGGG" * 10]  # short ambiguity codes stay


def test_bundled_fasta_becomes_protein_records(tmp_path, sample_fasta):
    writer, skipped = preprocess_uniprot([sample_fasta], tmp_path)
    records = list(iter_shard_records(writer.shard_paths))
    assert skipped == 0 and len(records) == 600
    assert records[0][:2] == ("protein", "938293.PRJEB85.HG003688_1")
    assert all(m == "protein" and "*" not in seq and seq.isupper() for m, _, seq in records)
    raw = gzip.decompress(sample_fasta.read_bytes()).decode().split(">")[1]
    assert records[0][2] == raw.split("\n", 1)[1].replace("\n", "").rstrip("*")


def test_encoded_tokens_decode_back_to_the_records(tmp_path, sample_fasta, sample_tokenizer):
    writer, _ = preprocess_uniprot([sample_fasta], tmp_path / "records")
    metas = encode_shards(writer.shard_paths, sample_tokenizer.model_file, tmp_path / "enc", "uniprot", 0.1)
    assert metas["train"]["n_records"] + metas["val"]["n_records"] == 600 and metas["val"]["n_records"] > 20
    records = list(iter_shard_records(writer.shard_paths))
    for split in ("train", "val"):
        source = TokenSource(tmp_path / "enc" / split / "uniprot")
        expected = [r for r in records if is_val_record(r[1], 0.1) == (split == "val")]
        assert source.tokens.dtype == np.uint16 and len(source.offsets) == len(expected) + 1
        for index in (0, len(expected) // 2, len(expected) - 1):
            ids = source.tokens[source.offsets[index] : source.offsets[index + 1]]
            assert sample_tokenizer.decode(ids) == "<protein>" + expected[index][2]
    assert (tmp_path / "enc" / "tokenizer.model").read_bytes() == sample_tokenizer.model_file.read_bytes()
    with pytest.raises(PreprocessError, match="already exists"):  # never overwrite encoded data
        encode_shards(writer.shard_paths, sample_tokenizer.model_file, tmp_path / "enc", "uniprot", 0.1)


def truncated_genbank(text):
    return text[: text.index("ORIGIN") + 2000]


def genbank_without_origin(text):
    return text[: text.index("ORIGIN")] + "//\n"


@pytest.mark.parametrize(
    "make_text, message",
    [
        (truncated_genbank, "truncated"),
        (genbank_without_origin, "record 1 \\(BGC0001090\\), near line .*: Premature end of features table"),
        (lambda text: "", "no GenBank records"),
        (lambda text: "just some text\n", "no GenBank records"),
        (lambda text: text.replace("tgccttt", "tgcc1!t", 1), "invalid nucleotide"),
    ],
    ids=["truncated", "missing-origin", "empty", "not-genbank", "bad-letters"],
)
def test_bad_genbank_fails_cleanly_without_shards(tmp_path, sample_genbank, make_text, message):
    good = genbank_text(sample_genbank)
    bad = tmp_path / "bad.gbk"
    bad.write_text(make_text(good))
    out_dir = tmp_path / "out"
    with pytest.raises(PreprocessError, match=message) as info:
        preprocess_genbank([sample_genbank, bad], out_dir)  # a good file first: its shard must not survive
    assert str(bad) in str(info.value)
    assert not out_dir.exists()  # not even an empty folder


def small_genbank(name: str, locus: str | None = None, source: str = '/mol_type="genomic DNA"', seq: str = "") -> str:
    """One 60-bp GenBank record; `locus`, `source` and `seq` replace its LOCUS line, qualifier, sequence line."""
    locus = locus or f"LOCUS       {name:<24}  60 bp    DNA     linear   BCT 01-JAN-2020"
    seq = seq or "        1 " + " ".join(["acgtacgtac"] * 6)
    return (
        f"{locus}\nDEFINITION  test.\nACCESSION   {name}\nVERSION     {name}.1\n"
        f"FEATURES             Location/Qualifiers\n     source          1..60\n                     {source}\n"
        f"ORIGIN\n{seq}\n//\n"
    )


@pytest.mark.parametrize(
    "second, problem",
    [
        (
            small_genbank("REC2", locus="LOCUS       REC2 60 xx DNA linear 1 2 3 4 5 6 7 8"),
            "Did not recognise the LOCUS line layout: 'LOCUS       REC2 60 xx DNA linear 1 2 3 4 5 6 7 8'",
        ),
        (
            small_genbank("REC2", locus="LOCUS       REC2 sixty bp DNA linear"),
            "bad LOCUS line (invalid literal for int() with base 10: 'sixty'): 'LOCUS       REC2 sixty bp DNA linear'",
        ),
        (
            small_genbank("REC2", locus="LOCUS REC2 60 bp DNA linear"),
            "LOCUS line not in GenBank layout ('LOCUS' and 7 spaces; Biopython would skip the record): "
            "'LOCUS REC2 60 bp DNA linear'",
        ),
        (
            small_genbank("REC2", source='/mol_type="genomic DNA'),
            "Problem with 'source' feature: '1..60 / /mol_type=\"genomic DNA'",
        ),
        (
            small_genbank("REC2", seq="        " + " ".join(["acgtacgtac"] * 6)),
            "Sequence line mal-formed, '       acgtacgtac",
        ),
        (
            small_genbank("REC2").replace(" 60 bp", " 61 bp"),
            "length differs from LOCUS (Expected sequence length 61, found 60 (REC2.1)): 'LOCUS       REC2",
        ),
    ],
    ids=["locus-layout", "locus-length-word", "locus-spacing", "open-quote", "sequence-line", "locus-length"],
)
def test_malformed_genbank_is_one_line_naming_file_record_and_line(tmp_path, capsys, second, problem):
    """Before: Biopython's message ended the line ("Did not recognise the LOCUS line layout:") without the line or
    the record, a LOCUS line with other spacing lost its record silently, and an open quote printed several lines."""
    bad = tmp_path / "two.gbk"
    bad.write_text(small_genbank("REC1") + second)
    assert run_cli(main_genbank, ["--num_proc", "1", str(bad), "--out_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: record 2 (REC2), near line 1"), (
        err
    )  # its lines are 11-20
    assert problem in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        (">p1 ok\nMKVLA\n>p2 bad\nMKV1LA*\n", "record p2: invalid amino-acid character"),
        (">p1\nMKV*LA\n", "invalid amino-acid"),
        (">p1\n\n>p2\nMKV\n", "record p1: empty record"),
        ("MKVLA\n>p1\nMKV\n", "text before the first"),
        ("", "no records"),
    ],
    ids=["digit", "inner-stop", "empty-record", "text-before-header", "empty-file"],
)
def test_bad_fasta_fails_cleanly_without_shards(tmp_path, text, message):
    bad = tmp_path / "bad.faa"
    bad.write_text(text)
    with pytest.raises(PreprocessError, match=message):
        preprocess_uniprot([bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_skip_invalid_counts_bad_proteins(tmp_path):
    fasta = tmp_path / "mixed.faa.gz"
    with gzip.open(fasta, "wt") as handle:
        handle.write(">a\nMKVL*\n>b\nMK#VL\n>c\nmkvl\n")
    writer, skipped = preprocess_uniprot([fasta], tmp_path / "out", skip_invalid=True)
    assert skipped == 1 and [seq for _, _, seq in iter_shard_records(writer.shard_paths)] == ["MKVL", "MKVL"]


def test_existing_shards_are_never_overwritten(tmp_path, sample_fasta):
    first, _ = preprocess_uniprot([sample_fasta], tmp_path)
    before = first.shard_paths[0].read_bytes()
    with pytest.raises(PreprocessError, match="already exist"):
        preprocess_uniprot([sample_fasta], tmp_path)
    assert first.shard_paths[0].read_bytes() == before


def test_cli_prints_one_error_line_and_exits_1(tmp_path, recipe_dir):
    bad = tmp_path / "bad.faa"
    bad.write_text(">x1\nMKQ9\n")
    result = subprocess.run(
        [sys.executable, "-m", "preprocessing.preprocess_uniprot", str(bad), "--out_dir", str(tmp_path / "out")],
        cwd=recipe_dir,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {bad}: record x1: invalid amino-acid character(s) '9'"]
    assert not (tmp_path / "out").exists()


def cut_gzip(source, dest, keep=0.5):
    """A copy of a gzip file cut short, as an interrupted copy or download leaves it."""
    data = source.read_bytes()
    dest.write_bytes(data[: int(len(data) * keep)])
    return dest


@pytest.mark.parametrize("step", ["preprocess_genbank", "preprocess_uniprot", "train_tokenizer", "encode_shards"])
def test_truncated_gzip_is_a_one_line_error_without_output(
    tmp_path, recipe_dir, sample_genbank, sample_fasta, sample_tokenizer, step
):
    out = tmp_path / "out"
    if step in ("preprocess_genbank", "preprocess_uniprot"):
        good = sample_genbank if step == "preprocess_genbank" else sample_fasta
        bad = cut_gzip(good, tmp_path / f"cut-{good.name}")
        args = [str(good), str(bad), "--out_dir", str(out)]  # the good file's shard must not survive either
    else:
        writer, _ = preprocess_uniprot([sample_fasta], tmp_path / "records")
        good = writer.shard_paths[0]
        bad = cut_gzip(good, tmp_path / "records" / "cut_00000.tsv.gz", keep=0.8)
        if step == "train_tokenizer":
            args = [str(good), str(bad), "--model_file", str(out / "tokenizer.model"), "--vocab_size", "64"]
        else:
            args = [str(good), str(bad), "--tokenizer", str(sample_tokenizer.model_file), "--base_dir", str(out)]
            args += ["--source", "uniprot"]
    result = subprocess.run(
        [sys.executable, "-m", f"preprocessing.{step}", *args], cwd=recipe_dir, capture_output=True, text=True
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()  # tqdm's progress lines come first
    assert lines[-1] == f"error: {bad}: truncated or corrupt gzip" and "error" not in "".join(lines[:-1])
    assert not out.exists() or [p for p in out.rglob("*") if p.is_file()] == []


def test_gzip_with_a_bad_checksum_is_an_error(tmp_path, sample_genbank):
    data = bytearray(sample_genbank.read_bytes())
    data[-6] ^= 0xFF  # inside the CRC-32 trailer: every byte decompresses, the check at the end fails
    bad = tmp_path / "bad-crc.gbk.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(PreprocessError, match="bad-crc.gbk.gz: truncated or corrupt gzip"):
        preprocess_genbank([bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gzip_is_detected_by_content(tmp_path, sample_genbank):
    plain = tmp_path / "record.txt"
    plain.write_bytes(gzip.decompress(sample_genbank.read_bytes()))
    hidden_gzip = tmp_path / "record.dat"
    hidden_gzip.write_bytes(sample_genbank.read_bytes())
    for path in (plain, hidden_gzip):
        records = list(iter_shard_records(preprocess_genbank([path], tmp_path / f"out{path.suffix}").shard_paths))
        assert len(records[0][2]) == 44660


def test_ten_thousand_real_uniref_proteins_pass_and_round_trip(tmp_path, uniref_parquet, sample_tokenizer):
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(uniref_parquet, columns=["id", "sequence"]).to_pydict()
    fasta = tmp_path / "uniref.fasta"
    fasta.write_text("".join(f">{i}\n{s}\n" for i, s in zip(table["id"], table["sequence"])))
    writer, skipped = preprocess_uniprot([fasta], tmp_path / "records")
    records = list(iter_shard_records(writer.shard_paths))
    assert skipped == 0 and len(records) == len(table["id"]) == 10_000
    assert [seq for _, _, seq in records[:50]] == [s.upper() for s in table["sequence"][:50]]
    for _, _, sequence in records[::500]:
        (ids,) = sample_tokenizer.encode("protein", [sequence])
        assert sample_tokenizer.decode(ids) == "<protein>" + sequence


def test_utf8_headers_are_kept_in_the_shards_and_the_cli_leaves_no_folder_on_error(tmp_path, recipe_dir):
    fasta = tmp_path / "u.faa"
    fasta.write_bytes(">sp|P1|Ångström µ-7 protein\nMKV\n".encode())
    writer, _ = preprocess_uniprot([fasta], tmp_path / "records")
    assert list(iter_shard_records(writer.shard_paths)) == [("protein", "sp|P1|Ångström", "MKV")]
    bad = tmp_path / "bad.faa"
    bad.write_bytes(">p1 Ångström\nMKV\n>p2 ü\nMK7\n".encode())
    result = subprocess.run(
        [sys.executable, "-m", "preprocessing.preprocess_uniprot", str(bad), "--out_dir", str(tmp_path / "out")],
        cwd=recipe_dir,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {bad}: record p2: invalid amino-acid character(s) '7'"
    assert not (tmp_path / "out").exists()


def shard_bytes(paths):
    return [Path(p).read_bytes() for p in paths]


@pytest.mark.slow
def test_two_processes_write_identical_shards(tmp_path, sample_genbank, sample_fasta, monkeypatch):
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 20_000)  # many blocks from the small sample files
    out = {}
    for num_proc in (1, 2):
        genbank = preprocess_genbank(
            [sample_genbank, sample_genbank],
            tmp_path / f"g{num_proc}",
            split_length=2000,
            shard_chars=30_000,
            num_proc=num_proc,
        )
        uniprot, _ = preprocess_uniprot(
            [sample_fasta], tmp_path / f"u{num_proc}", shard_chars=50_000, num_proc=num_proc
        )
        out[num_proc] = shard_bytes(genbank.shard_paths), shard_bytes(uniprot.shard_paths)
    assert out[1] == out[2] and len(out[1][0]) > 1 and len(out[1][1]) > 1
