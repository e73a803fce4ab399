"""k-mer tokens, reverse complement, fragment sampler bounds and per-batch determinism."""

import numpy as np
import pytest
import torch
from conftest import write_fasta_gz

from data import (
    FragmentSampler,
    KmerTokenizer,
    TrainBatches,
    reverse_complement_codes,
    train_loader,
    validation_fragments,
)
from preprocess import GenomeEntry, GtdbDataError, build_or_load_index


def test_kmer_ids_by_hand():
    tokenizer = KmerTokenizer(k=3)
    # A=0 T=1 C=2 G=3, first base most significant: "ATG" = 0*16 + 1*4 + 3 = 7, "TGC" = 16 + 12 + 2 = 30
    assert tokenizer.tokens_from_sequence("ATGC").tolist() == [7, 30]
    assert tokenizer.tokens_from_sequence("GGGNA").tolist() == [63, tokenizer.n_token, tokenizer.n_token]
    assert KmerTokenizer(5).vocab_size == 1026
    with pytest.raises(ValueError, match="not a nucleotide"):
        tokenizer.tokens_from_sequence("AC*T")


def test_reverse_complement():
    codes = np.array([[0, 0, 2, 3, 4, 1]], dtype=np.uint8)  # AACGNT
    assert "".join("ATCGN"[c] for c in reverse_complement_codes(codes)[0]) == "ANCGTT"


@pytest.fixture()
def small_index(tmp_path):
    genomes = {
        "GCA_000000001.1": [("c1", "A" * 50 + "C" * 50), ("short", "G" * 20)],
        "GCA_000000002.1": [("c1", "T" * 30), ("c2", "ACGT" * 25)],
        "GCA_000000003.1": [("tiny", "ACGTACGT")],  # shorter than any fragment: dropped by the sampler
    }
    entries = [
        GenomeEntry(acc, "F", "G", str(write_fasta_gz(tmp_path / f"{acc}.fna.gz", recs)))
        for acc, recs in genomes.items()
    ]
    return build_or_load_index(entries, [10, 11, 12], tmp_path / "cache", "t", show_progress=False)


def test_sampler_stays_inside_contigs(small_index):
    sampler = FragmentSampler(small_index, fragment_bp=25, max_n_fraction=1.0)
    assert sampler.dropped == ["GCA_000000003.1"] and sampler.labels.tolist() == [10, 11]
    rng = np.random.default_rng(0)
    genomes = rng.integers(0, 2, size=3000)
    offsets = sampler.draw_offsets(rng, genomes)
    # valid starts: genome 0 only in its 100 bp contig (the 20 bp one is too short), genome 1 in both contigs
    contigs = small_index.contigs.tolist()  # [start, length] rows: g0 c1, g0 short, g1 c1, g1 c2
    valid = {0: set(range(0, 76)), 1: set(range(120, 126)) | set(range(150, 226))}
    assert contigs[0] == [0, 100] and contigs[2] == [120, 30] and contigs[3] == [150, 100]
    for genome in (0, 1):
        seen = set(offsets[genomes == genome].tolist())
        assert seen == valid[genome]  # inside, never across a contig end, and every start is reachable
    fragments = sampler.sample(rng, np.zeros(50, dtype=int))
    assert set(np.unique(fragments).tolist()) <= {0, 2}  # genome 0's long contig is A/C only


def test_all_genomes_too_short_is_an_error(small_index):
    with pytest.raises(GtdbDataError, match="no genome has a contig of at least 500 bp"):
        FragmentSampler(small_index, fragment_bp=500)


def test_batches_are_deterministic_per_batch_number(small_index):
    sampler = FragmentSampler(small_index, fragment_bp=25)
    dataset = TrainBatches(sampler, KmerTokenizer(5), batch_size=8, n_tokens=16, seed=1, rank=0)
    first, again, other = dataset[5], dataset[5], dataset[6]
    assert first["tokens"].shape == (8, 16) and first["tokens"].max() < 1024
    assert torch.equal(first["tokens"], again["tokens"]) and torch.equal(first["labels"], again["labels"])
    assert not torch.equal(first["tokens"], other["tokens"])
    other_rank = TrainBatches(sampler, KmerTokenizer(5), batch_size=8, n_tokens=16, seed=1, rank=1)[5]
    assert not torch.equal(first["tokens"], other_rank["tokens"])
    with pytest.raises(GtdbDataError, match="data.train_tokens=26 tokens needs fragments of >= 30 bp"):
        TrainBatches(sampler, KmerTokenizer(5), batch_size=8, n_tokens=26, seed=1, rank=0)


def test_validation_fragments_cover_every_genome(small_index):
    sampler = FragmentSampler(small_index, fragment_bp=25)
    tokens, labels = validation_fragments(sampler, KmerTokenizer(5), 3, 21, seed=0, rank=0)
    assert tokens.shape == (6, 21) and labels.tolist() == [10, 10, 10, 11, 11, 11]
    again, _ = validation_fragments(sampler, KmerTokenizer(5), 3, 21, seed=0, rank=0)
    assert torch.equal(tokens, again)
    with pytest.raises(GtdbDataError, match="data.val_tokens=22 tokens"):
        validation_fragments(sampler, KmerTokenizer(5), 3, 22, seed=0, rank=0)


def test_ambiguous_fragments_are_resampled(tmp_path):
    sequence = "N" * 60 + "ACGT" * 10  # fragments of 20 bp: most starts hit Ns
    entry = GenomeEntry("GCA_000000001.1", "F", "G", str(write_fasta_gz(tmp_path / "g.fna.gz", [("c", sequence)])))
    index = build_or_load_index([entry], [0], tmp_path / "cache", "t", show_progress=False)
    rng = np.random.default_rng(0)
    strict = FragmentSampler(index, 20, max_n_fraction=0.0, max_tries=50).sample(rng, np.zeros(200, dtype=int))
    loose = FragmentSampler(index, 20, max_n_fraction=1.0).sample(rng, np.zeros(200, dtype=int))
    assert (strict == 4).sum() == 0 and (loose == 4).sum() > 0


def test_background_workers_deliver_the_same_batches(small_index):
    """The loader's worker count must not change the data, or a resume on another machine would diverge."""
    dataset = TrainBatches(FragmentSampler(small_index, fragment_bp=25), KmerTokenizer(5), 4, 16, seed=3, rank=0)
    in_process = list(train_loader(dataset, first_batch=10, n_batches=6, num_workers=0))
    in_workers = list(train_loader(dataset, first_batch=10, n_batches=6, num_workers=2))
    assert len(in_workers) == 6
    for a, b in zip(in_process, in_workers):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(in_process[0]["tokens"], dataset[10]["tokens"])


def test_validation_fragments_respect_reverse_complement_flag(small_index):
    # k=1 tokens are the base codes; genome 0's only usable contig is A/C, so a T or G means reverse-complemented
    sampler = FragmentSampler(small_index, fragment_bp=25)
    tokens, labels = validation_fragments(sampler, KmerTokenizer(1), 40, 25, seed=0, rank=0, reverse_complement=False)
    assert set(tokens[labels == 10].unique().tolist()) <= {0, 2}
    flipped, _ = validation_fragments(sampler, KmerTokenizer(1), 40, 25, seed=0, rank=0, reverse_complement=True)
    assert set(flipped[labels == 10].unique().tolist()) == {0, 1, 2, 3}
