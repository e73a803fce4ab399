"""Fragment sampling from a GenomeIndex and k-mer tokenisation.

Each training batch is drawn from its own RNG seeded by (seed, rank, batch number), so batches do not depend on
worker count or on what came before: resuming at batch b reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from biorecipes_shared import all_reduce_mean, barrier, recorded_differences
from genome_fasta import BASE_LOOKUP, INVALID_CODE, N_CODE
from preprocess import (
    INDEX_FORMAT_VERSION,
    FamilySplit,
    GenomeIndex,
    GtdbDataError,
    build_or_load_index,
    cached_family_split,
    shard_for_rank,
    split_fingerprint,
)

log = logging.getLogger(__name__)


class KmerTokenizer:
    """Overlapping, non-canonical k-mers: id = base-4 number of the k-mer (A=0, T=1, C=2, G=3, first base highest).

    A k-mer containing N gets `n_token`; `pad_token` fills sequences shorter than the batch.
    """

    def __init__(self, k: int = 5):
        self.k = k
        self.n_token = 4**k
        self.pad_token = 4**k + 1
        self.vocab_size = 4**k + 2
        self._place_values = torch.tensor([4 ** (k - 1 - i) for i in range(k)], dtype=torch.long)

    def tokens_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(batch, bases) uint8 base codes -> (batch, bases - k + 1) token ids."""
        windows = codes.long().unfold(-1, self.k, 1)  # (batch, n_kmers, k)
        ids = (windows.clamp(max=3) * self._place_values).sum(-1)
        return torch.where((windows == N_CODE).any(-1), self.n_token, ids)

    def tokens_from_sequence(self, sequence: str) -> torch.Tensor:
        """A DNA string -> 1-D token ids (IUPAC ambiguity letters count as N)."""
        codes = BASE_LOOKUP[np.frombuffer(sequence.encode("ascii", errors="replace"), dtype=np.uint8)]  # '?': invalid
        if (codes == INVALID_CODE).any():
            raise ValueError(f"sequence contains a character that is not a nucleotide: {sequence[:40]!r}...")
        if codes.size < self.k:
            raise ValueError(f"sequence of {codes.size} bases is shorter than k={self.k}")
        return self.tokens_from_codes(torch.from_numpy(codes.copy())[None])[0]


def reverse_complement_codes(codes: np.ndarray) -> np.ndarray:
    """Reverse complement of base codes along the last axis: A(0)<->T(1), C(2)<->G(3), N stays N."""
    flipped = codes[..., ::-1]
    return np.where(flipped < N_CODE, flipped ^ 1, flipped).astype(np.uint8)


class FragmentSampler:
    """Draws fixed-length fragments uniformly over all valid start positions of a genome.

    That is the same as choosing a contig with probability proportional to its number of valid starts, then a start
    uniformly within it. Contigs shorter than the fragment are never used; genomes with no such contig are dropped
    (logged) and listed in `dropped`.
    """

    def __init__(self, index: GenomeIndex, fragment_bp: int, max_n_fraction: float = 0.05, max_tries: int = 10):
        self.index, self.fragment_bp = index, fragment_bp
        self.max_n_fraction, self.max_tries = max_n_fraction, max_tries
        starts, lengths = index.contigs[:, 0], index.contigs[:, 1]
        valid_starts = np.maximum(lengths - fragment_bp + 1, 0)
        per_genome = np.array([valid_starts[first : first + n].sum() for _, first, n in index.genomes], dtype=np.int64)
        self.dropped = [index.accessions[i] for i in np.flatnonzero(per_genome == 0)]
        for accession in self.dropped:
            log.warning("genome %s skipped: every contig is shorter than the %d bp fragment", accession, fragment_bp)
        self.genome_rows = np.flatnonzero(per_genome > 0)  # usable rows of index.genomes
        if self.genome_rows.size == 0:
            raise GtdbDataError(
                f"index {index.directory}: no genome has a contig of at least {fragment_bp} bp (data.fragment_bp)"
            )
        self.labels = index.genomes[self.genome_rows, 0]  # split positions until assign_classes() makes them dense
        self.n_classes: int | None = None
        # A "virtual coordinate" enumerates every valid start of every contig back to back; a draw in
        # [genome_offset[g], genome_offset[g] + n_starts[g]) maps to (contig, start) by binary search.
        self._contig_cum_starts = np.concatenate([[0], np.cumsum(valid_starts)])
        self._contig_offsets = starts
        self._genome_first_virtual = self._contig_cum_starts[index.genomes[self.genome_rows, 1]]
        self._genome_n_starts = per_genome[self.genome_rows]

    def __len__(self) -> int:
        return int(self.genome_rows.size)

    def draw_offsets(self, rng: np.random.Generator, genomes: np.ndarray) -> np.ndarray:
        """Offsets into `index.sequence` of fragment starts, for positions `genomes` in `genome_rows`."""
        virtual = self._genome_first_virtual[genomes] + (
            rng.random(len(genomes)) * self._genome_n_starts[genomes]
        ).astype(np.int64)
        contig = np.searchsorted(self._contig_cum_starts, virtual, side="right") - 1
        return self._contig_offsets[contig] + (virtual - self._contig_cum_starts[contig])

    def sample(self, rng: np.random.Generator, genomes: np.ndarray) -> np.ndarray:
        """Fragments (len(genomes), fragment_bp) uint8 for positions `genomes` in `genome_rows`."""
        out = np.empty((len(genomes), self.fragment_bp), dtype=np.uint8)
        pending = np.arange(len(genomes))
        for attempt in range(self.max_tries):
            begin = self.draw_offsets(rng, genomes[pending])
            out[pending] = self.index.sequence[begin[:, None] + np.arange(self.fragment_bp)]
            too_ambiguous = (out[pending] == N_CODE).mean(axis=1) > self.max_n_fraction
            if attempt < self.max_tries - 1:  # after the last try keep what we have (N maps to its own token)
                pending = pending[too_ambiguous]
            if pending.size == 0:
                break
        return out


def check_crop(n_tokens: int, fragment_bp: int, tokenizer: KmerTokenizer, setting: str) -> None:
    """A crop of n k-mer tokens needs n + k - 1 bases."""
    if n_tokens > fragment_bp - tokenizer.k + 1:
        raise GtdbDataError(
            f"{setting}={n_tokens} tokens needs fragments of >= {n_tokens + tokenizer.k - 1} bp, "
            f"data.fragment_bp is {fragment_bp}"
        )


class TrainBatches(Dataset):
    """Map-style dataset whose item b is training batch b of this rank (tokens, labels)."""

    def __init__(
        self,
        sampler: FragmentSampler,
        tokenizer: KmerTokenizer,
        batch_size: int,
        n_tokens: int,
        seed: int,
        rank: int,
        reverse_complement: bool = True,
    ):
        check_crop(n_tokens, sampler.fragment_bp, tokenizer, "data.train_tokens")
        self.sampler, self.tokenizer, self.batch_size, self.n_tokens = sampler, tokenizer, batch_size, n_tokens
        self.seed, self.rank, self.reverse_complement = seed, rank, reverse_complement

    def __len__(self) -> int:
        return 2**62  # effectively infinite; the DataLoader's sampler chooses the batch numbers

    def __getitem__(self, batch_number: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, batch_number])
        genomes = rng.integers(0, len(self.sampler), size=self.batch_size)
        codes = self.sampler.sample(rng, genomes)
        if self.reverse_complement:
            flip = rng.random(self.batch_size) < 0.5
            codes[flip] = reverse_complement_codes(codes[flip])
        codes = codes[:, : self.n_tokens + self.tokenizer.k - 1]
        tokens = self.tokenizer.tokens_from_codes(torch.from_numpy(codes))
        return {"tokens": tokens, "labels": torch.from_numpy(self.sampler.labels[genomes].astype(np.int64))}


def train_loader(dataset: TrainBatches, first_batch: int, n_batches: int, num_workers: int) -> DataLoader:
    """Loader over batch numbers [first_batch, first_batch + n_batches), prefetched by background workers."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=range(first_batch, first_batch + n_batches),
        num_workers=num_workers,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )


def validation_fragments(
    sampler: FragmentSampler,
    tokenizer: KmerTokenizer,
    fragments_per_genome: int,
    n_tokens: int,
    seed: int,
    rank: int,
    reverse_complement: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed set of validation fragments, `fragments_per_genome` from every validation genome; same each call."""
    check_crop(n_tokens, sampler.fragment_bp, tokenizer, "data.val_tokens")
    rng = np.random.default_rng([seed, 1_000_003, rank])  # separate stream from the training batches
    genomes = np.repeat(np.arange(len(sampler)), fragments_per_genome)
    codes = sampler.sample(rng, genomes)
    if reverse_complement:
        flip = rng.random(len(genomes)) < 0.5
        codes[flip] = reverse_complement_codes(codes[flip])
    codes = codes[:, : n_tokens + tokenizer.k - 1]
    return tokenizer.tokens_from_codes(torch.from_numpy(codes)), torch.from_numpy(
        sampler.labels[genomes].astype(np.int64)
    )


# ----------------------------------------------------------------------------------------------- classes, fingerprint
def assign_classes(sampler: FragmentSampler) -> int:
    """Number the training classes 0..C-1 over the genomes usable on some rank and relabel `sampler.labels`.

    A skipped genome (unreadable, only N, every contig shorter than a fragment) yields no fragment, so it must not be
    a class: its CurricularFace row would only ever be a negative. Classes keep the split's order (ascending split
    position), the same on every rank; under torch.distributed the usable positions are all-gathered. Returns C
    (also stored as `sampler.n_classes`). Idempotent.
    """
    local = sorted(int(label) for label in sampler.labels)
    gathered = [local]
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
    used = np.array(sorted(set().union(*gathered)), dtype=np.int64)
    sampler.labels = np.searchsorted(used, sampler.labels).astype(np.int64)
    sampler.n_classes = len(used)
    return len(used)


FINGERPRINT_VERSION = 1
FINGERPRINT_FILE = "data_fingerprint.json"


def data_fingerprint(data_cfg, split: FamilySplit, n_classes: int) -> dict:
    """What a model trained on this data depends on: tokenizer, fragment settings, the split and the classes."""
    return {
        "format_version": FINGERPRINT_VERSION,
        "index_format_version": INDEX_FORMAT_VERSION,
        "tokenizer": {"kmer": int(data_cfg.kmer), "base_order": "ATCG", "n_token": 4 ** int(data_cfg.kmer)},
        "fragment": {
            key: getattr(data_cfg, key)
            for key in ("fragment_bp", "train_tokens", "val_tokens", "reverse_complement", "max_n_fraction")
        },
        **split_fingerprint(split),
        "n_classes": int(n_classes),
    }


def check_data_fingerprint(output_dir, data_cfg, split: FamilySplit, sampler: FragmentSampler, resuming: bool) -> Path:
    """Record this run's data fingerprint in `<output_dir>/data_fingerprint.json`, or, when resuming, check it first.

    A resumed run whose k-mer size, fragment settings, split, genome list or class count differ from the recorded
    ones raises GtdbDataError in one line naming the record, the training index and every differing key. An output
    dir without a record (older version) gets a warning and the record is written. Returns the record's path.
    """
    fingerprint = data_fingerprint(data_cfg, split, sampler.n_classes or assign_classes(sampler))
    record = Path(output_dir) / FINGERPRINT_FILE
    if resuming and record.is_file():
        detail = recorded_differences(record, fingerprint, GtdbDataError)
        if detail:
            raise GtdbDataError(
                f"{record}: the checkpoints were trained on other data than {sampler.index.directory / 'manifest.json'} "
                f"with this config ({detail}); use the original settings or a new output_dir"
            )
        return record
    if resuming:
        log.warning("%s: missing (run from an older version): data settings not checked, recording them", record)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{record.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    os.replace(tmp, record)  # every rank writes the same bytes; the rename keeps readers from a half-written file
    return record


def prepare_data(cfg, dist_ctx, log):
    """Split the metadata, build or load this rank's training index and the validation index."""
    data = cfg.data
    split_options = {
        key: getattr(data, key)
        for key in (
            "contamination_column",
            "max_contamination",
            "val_species_target",
            "n_val_genomes",
            "family_count_cap",
            "val_per_genus",
            "train_per_genus",
        )
    }
    split = cached_family_split(
        list(data.metadata_files), data.genomes_root, data.cache_dir, seed=cfg.seed, **split_options
    )
    log.info("split: %s", split.stats)
    shard = shard_for_rank(len(split.train), dist_ctx.rank, dist_ctx.world_size)
    show_progress = dist_ctx.is_main
    train_index = build_or_load_index(
        [split.train[i] for i in shard],
        shard,
        data.cache_dir,
        f"train-rank{dist_ctx.rank}of{dist_ctx.world_size}",
        show_progress,
        workers=data.index_workers,
    )
    val_labels = list(range(len(split.val)))
    if dist_ctx.local_rank == 0:  # one builder per node; the others wait and memory-map it
        build_or_load_index(split.val, val_labels, data.cache_dir, "val", show_progress, workers=data.index_workers)
    barrier()
    val_index = build_or_load_index(split.val, val_labels, data.cache_dir, "val", False, workers=data.index_workers)

    train_sampler = FragmentSampler(train_index, data.fragment_bp, data.max_n_fraction)
    val_sampler = FragmentSampler(val_index, data.fragment_bp, data.max_n_fraction)
    assign_classes(train_sampler)  # a skipped genome is not a class
    train_skipped = all_reduce_mean(float(len(train_index.skipped) + len(train_sampler.dropped))) * dist_ctx.world_size
    val_skipped = len(val_index.skipped) + len(val_sampler.dropped)
    (log.warning if train_skipped or val_skipped else log.info)(
        "genomes: %d training classes (%d on this rank), %d validation; skipped %d training and %d validation genomes",
        train_sampler.n_classes,
        len(train_sampler),
        len(val_sampler),
        round(train_skipped),
        val_skipped,
    )
    if len(val_sampler) < 2:
        raise GtdbDataError(f"only {len(val_sampler)} usable validation genome(s) left; the AUC needs at least 2")
    return split, train_sampler, val_sampler
