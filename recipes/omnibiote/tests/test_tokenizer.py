"""The shared sentencepiece tokenizer: special ids, modality prefixes and round trips on all three modalities."""

import gzip

import pytest

from errors import PreprocessError
from preprocessing.shards import ShardWriter
from preprocessing.train_tokenizer import explain_sentencepiece_error, train_tokenizer
from tokenizer import OmniTokenizer


def real_sequences(sample_genbank, sample_fasta):
    """A stretch of the bundled GenBank record (DNA, and as RNA) and the first bundled protein."""
    text = gzip.decompress(sample_genbank.read_bytes()).decode()
    origin = text[text.index("ORIGIN") :]
    dna = "".join(ch for ch in origin if ch.isalpha() and ch != "O")[6:1206].upper()
    protein = (
        gzip.decompress(sample_fasta.read_bytes())
        .decode()
        .split(">")[1]
        .split("\n", 1)[1]
        .replace("\n", "")
        .rstrip("*")
    )
    return {"dna": dna, "rna": dna.replace("T", "U"), "protein": protein}


def test_sample_tokenizer_round_trips_dna_rna_and_protein(sample_tokenizer, sample_genbank, sample_fasta):
    sequences = real_sequences(sample_genbank, sample_fasta)
    assert set(sequences["dna"]) <= set("ACGT") and len(sequences["dna"]) == 1200
    for modality, sequence in sequences.items():
        (ids,) = sample_tokenizer.encode(modality, [sequence])
        assert ids[0] == sample_tokenizer.modality_ids[modality] and ids[-1] == sample_tokenizer.eos_id
        assert sample_tokenizer.unk_id not in ids
        assert len(ids) < len(sequence)  # BPE merges residues into longer pieces
        assert sample_tokenizer.decode(ids) == f"<{modality}>{sequence}"


def test_modalities_are_distinguishable_and_specials_fixed(sample_tokenizer):
    tok = sample_tokenizer
    assert (tok.pad_id, tok.unk_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3)
    assert len(set(tok.modality_ids.values())) == 3
    # the same letters as DNA or protein differ by their first token only
    dna, protein = tok.encode("dna", ["ACGTACGT"])[0], tok.encode("protein", ["ACGTACGT"])[0]
    assert dna[1:] == protein[1:] and dna[0] != protein[0]


def test_long_sequences_are_encoded_in_chunks(sample_tokenizer, sample_genbank, sample_fasta):
    dna = real_sequences(sample_genbank, sample_fasta)["dna"]
    (ids,) = sample_tokenizer.encode("dna", [dna], chunk_length=100)
    assert sample_tokenizer.decode(ids) == f"<dna>{dna}"


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_tokenizer_on_mixed_shards(tmp_path, sample_genbank, sample_fasta, model_type):
    sequences = real_sequences(sample_genbank, sample_fasta)
    with ShardWriter(tmp_path / "records", "mixed") as writer:
        for index in range(0, 1200, 100):
            writer.add("dna", f"d{index}", sequences["dna"][index : index + 100])
            writer.add("rna", f"r{index}", sequences["rna"][index : index + 100])
        writer.add("protein", "p0", sequences["protein"])
    model_file = tmp_path / "tok.model"
    tokenizer = train_tokenizer(writer.shard_paths, model_file, vocab_size=80, model_type=model_type, chunk_length=64)
    assert model_file.is_file() and model_file.with_suffix(".vocab").is_file()
    assert tokenizer.vocab_size == 80
    for modality, sequence in sequences.items():
        assert tokenizer.decode(tokenizer.encode(modality, [sequence])[0]) == f"<{modality}>{sequence}"
    with pytest.raises(PreprocessError, match="already exists"):  # never overwrite a tokenizer
        train_tokenizer(writer.shard_paths, model_file, vocab_size=80)


def test_foreign_sentencepiece_model_is_rejected(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["ACGT" * 50, "MKVL" * 50]),
        model_prefix=str(tmp_path / "x"),
        vocab_size=12,
        minloglevel=2,
    )
    with pytest.raises(Exception, match="not an omnibiote tokenizer"):
        OmniTokenizer(tmp_path / "x.model")


@pytest.mark.parametrize(
    "vocab_size, model_type, message",
    [
        (20, "bpe", "--vocab_size 20 is below the 33 letters and special pieces; raise --vocab_size"),
        (5000, "unigram", r"--vocab_size 5000 is more than this sample of sequences can fill \(at most \d+ pieces\)"),
    ],
)
def test_sentencepiece_failure_is_one_line_and_leaves_no_folder(
    tmp_path, sample_fasta, vocab_size, model_type, message
):
    with ShardWriter(tmp_path / "records", "p") as writer:
        writer.add("protein", "p0", real_sequences(sample_fasta.parent / "BGC0001090.gbk.gz", sample_fasta)["protein"])
    model_file = tmp_path / "new" / "deeper" / "tok.model"
    with pytest.raises(PreprocessError, match=message) as err:
        train_tokenizer(writer.shard_paths, model_file, vocab_size=vocab_size, model_type=model_type, chunk_length=64)
    assert "\n" not in str(err.value) and not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "raw, expected",
    [
        (
            "INTERNAL: src/unigram_model_trainer.cc(581) [std::isfinite(score)]\nmore",
            "use a shorter --chunk_length than 2048 (e.g. 1024) or --model_type bpe",
        ),
        ("INTERNAL: something new\nsecond line", "sentencepiece training failed: INTERNAL: something new"),
    ],
)
def test_other_sentencepiece_errors_become_one_line(raw, expected):
    message = explain_sentencepiece_error(raw, 512, "unigram", 2048)
    assert expected in message and "\n" not in message
