"""Plant genomes -> non-overlapping 6-mer tokens -> overlapping next-token windows, mixed across species.

Layout of a data directory: `<data_dir>/<species>/*.fna|*.fa|*.fasta` (plain or gzip); the folder name is the
species. FASTA is streamed in fixed-size blocks (`fasta.py`) and cut into chunks of exactly `chunk_size` bp (the
last of a record shorter), so a chromosome of hundreds of Mbp is never held in memory, even written as one line, and
the windows do not depend on the line length. Windows never cross a chunk boundary. Non-ACGT bases (N, IUPAC codes)
split the sequence: no token or window spans them. Soft-masked (lowercase) bases are accepted and uppercased.

Token id of a 6-mer b0..b5 (A=0, C=1, G=2, T=3): sum(b_i * 4**(5 - i)), so AAAAAA=0 and TTTTTT=4095.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from biorecipes_shared import recorded_differences
from fasta import PlantDataError, stream_chunks

KMER = 6
VOCAB_SIZE = 4**KMER
TOKENIZER_VERSION = 1  # bump when the base order, the id formula or the N handling changes
FINGERPRINT_VERSION = 1
FINGERPRINT_FILE = "data_fingerprint.json"
FASTA_SUFFIXES = (".fna", ".fa", ".fasta")
INVALID = 4
log = logging.getLogger("plant_lm.data")


def _base_codes() -> bytes:
    table = bytearray([INVALID]) * 256
    for code, base in enumerate(b"ACGT"):
        table[base] = code
        table[base + 32] = code  # lowercase (soft-masked repeats)
    return bytes(table)


BASE_CODES = _base_codes()  # a bytes.translate table: base letter -> 0-3, anything else -> 4


def kmer_ids(codes: np.ndarray) -> np.ndarray:
    """Token ids (uint16) of the non-overlapping 6-mers of a run of base codes 0-3; a tail shorter than 6 is dropped."""
    n_tokens = len(codes) // KMER
    b = codes[: n_tokens * KMER].reshape(n_tokens, KMER)
    # sum(b_i * 4**(5-i)) as shifts: two 3-mer halves in uint8, then one uint16 combine (4x faster than a matmul).
    high = (b[:, 0] << 4) | (b[:, 1] << 2) | b[:, 2]
    low = (b[:, 3] << 4) | (b[:, 4] << 2) | b[:, 5]
    return (high.astype(np.uint16) << 6) | low


def tokenize(sequence: bytes | str) -> list[np.ndarray]:
    """6-mer token ids (uint16) of every ACGT run, split at each non-ACGT base (runs < 6 bp give nothing)."""
    if isinstance(sequence, str):
        sequence = sequence.encode("ascii", errors="replace")
    codes = np.frombuffer(sequence.translate(BASE_CODES), dtype=np.uint8)
    invalid = np.flatnonzero(codes == INVALID)
    # Valid runs lie between consecutive invalid bases; selecting the long ones is vectorised over the N's.
    starts = np.concatenate(([0], invalid + 1))
    stops = np.concatenate((invalid, [len(codes)]))
    long_enough = stops - starts >= KMER
    return [kmer_ids(codes[a:b]) for a, b in zip(starts[long_enough], stops[long_enough])]


def window_count(n_tokens: int, window_len: int, stride: int) -> int:
    """How many windows of `window_len` tokens start every `stride` tokens inside a run of `n_tokens`."""
    return 0 if n_tokens < window_len else (n_tokens - window_len) // stride + 1


def window_stride(context_size: int, overlap_ratio: float) -> int:
    """Tokens between the starts of consecutive windows (context_size * (1 - overlap_ratio), at least 1)."""
    return max(1, int(round(context_size * (1.0 - overlap_ratio))))


class SpeciesStream:
    """Endless, rank-sharded stream of windows over one species' FASTA files, in genomic order.

    Windows are numbered globally (0, 1, 2, ... across files and passes); rank r of W takes those with
    index % W == r. A window holds `context_size + 1` tokens: inputs are [:-1], next-token targets [1:].
    A file that turns out bad is skipped and counted in `bad_files` (warned once); a pass that yields no
    window at all raises PlantDataError (`check_has_window` raises it up front).
    """

    def __init__(
        self,
        species: str,
        files: list[Path],
        context_size: int,
        overlap_ratio: float,
        chunk_size: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.species, self.files = species, sorted(files)
        self.window_len = context_size + 1
        self.stride = window_stride(context_size, overlap_ratio)
        self.chunk_size, self.rank, self.world_size = chunk_size, rank, world_size
        self.bad_files: dict[str, str] = {}

    def windows(self, start: int = 0) -> Iterator[np.ndarray]:
        """Windows of this rank from global index `start` on (skipped windows are counted, not built)."""
        index = 0
        while True:
            before = index
            for path in self.files:
                if str(path) in self.bad_files:
                    continue
                try:
                    for _, chunk in stream_chunks(path, self.chunk_size):
                        for tokens in tokenize(chunk):
                            n = window_count(len(tokens), self.window_len, self.stride)
                            if index + n <= start:  # fast-forward on resume
                                index += n
                                continue
                            for k in range(n):
                                if index >= start and index % self.world_size == self.rank:
                                    offset = k * self.stride
                                    yield tokens[offset : offset + self.window_len]
                                index += 1
                except PlantDataError as err:
                    self._skip(path, err)
            if index == before:
                raise self._no_window_error()

    def check_has_window(self) -> None:
        """Raise the no-window PlantDataError now, reading only up to the first window (one chunk on real data)."""
        for path in self.files:
            if str(path) in self.bad_files:
                continue
            try:
                for _, chunk in stream_chunks(path, self.chunk_size):
                    if any(window_count(len(tokens), self.window_len, self.stride) for tokens in tokenize(chunk)):
                        return
            except PlantDataError as err:
                # Read to its error without a window, so this file adds no window to `windows()` either:
                # skipping it now leaves the window sequence unchanged and warns once, at startup.
                self._skip(path, err)
        raise self._no_window_error()

    def _skip(self, path: Path, err: PlantDataError) -> None:
        self.bad_files[str(path)] = str(err)
        log.warning("skipping bad file (%d so far for %s): %s", len(self.bad_files), self.species, err)

    def _no_window_error(self) -> PlantDataError:
        return PlantDataError(
            f"species {self.species}: no window of {self.window_len} tokens "
            f"({self.window_len * KMER} ACGT bp without N) in {len(self.files)} file(s); "
            f"{len(self.bad_files)} bad file(s). Sequences all-N, too short, or context_size too long?"
        )


def discover_species(data_dir: str | Path) -> dict[str, list[Path]]:
    """Map species (sub-folder name) -> its FASTA files; raise PlantDataError for a missing/empty dir or folder."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise PlantDataError(f"{data_dir}: data directory does not exist")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise PlantDataError(f"{data_dir}: no species folders; expected {data_dir}/<species>/*.fa[.gz]")
    species = {}
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and _is_fasta(p))
        if not files:
            raise PlantDataError(f"{folder}: species folder has no FASTA file (*.fna, *.fa, *.fasta, optionally .gz)")
        species[folder.name] = files
    return species


def _is_fasta(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(FASTA_SUFFIXES)


def parse_distribution(text: str) -> dict[str, float]:
    """Parse 'glycine_max=1.0,arabidopsis=0.8' into a dict (empty text: empty dict)."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise PlantDataError(f"species_distribution: {item!r} is not name=weight") from None
        if not sep:
            raise PlantDataError(f"species_distribution: {item!r} is not name=weight")
    return weights


def species_weights(found: list[str], distribution: dict[str, float], default_weight: float) -> dict[str, float]:
    """Normalised sampling weight per species found on disk.

    Weighted species missing on disk and non-positive weights raise PlantDataError; species on disk without a
    weight get `default_weight` and a warning. An empty distribution weights every species equally.
    """
    bad = {name: w for name, w in distribution.items() if not w > 0}
    if bad or not default_weight > 0:
        raise PlantDataError(f"species weights must be > 0, got {bad or {'default_weight': default_weight}}")
    missing = sorted(set(distribution) - set(found))
    if missing:
        raise PlantDataError(
            f"species {missing} are weighted in species_distribution but have no folder in the "
            f"data dir (found: {sorted(found)}); add the data or pass --species_distribution"
        )
    weights = {}
    for name in found:
        if distribution and name not in distribution:
            log.warning("species %s has no weight in species_distribution: using default %.2f", name, default_weight)
        weights[name] = distribution.get(name, default_weight)
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, context) int64 token ids
    targets: torch.Tensor  # (batch, context) next-token ids
    species_ids: torch.Tensor  # (batch,) index into the sorted species list


class SpeciesMixture:
    """Batches whose samples draw a species by weight, then that species' next window.

    The species draws use one RNG seeded by (seed, epoch) that is identical on every rank, so all ranks advance
    each species stream in lockstep: `positions[species]` (windows consumed job-wide) is the whole data state
    needed to resume, and windows trained at a later step always lie later in the genome than earlier ones.
    """

    def __init__(
        self,
        streams: dict[str, SpeciesStream],
        weights: dict[str, float],
        seed: int,
        positions: dict[str, int] | None = None,
    ):
        self.species = sorted(streams)
        self.streams = streams
        self.probs = np.array([weights[s] for s in self.species])
        self.seed = seed
        self.world_size = next(iter(streams.values())).world_size
        self.positions = {s: 0 for s in self.species} | dict(positions or {})
        self.fingerprint: dict = {}  # set by build_mixture: what a checkpoint of a model trained on it depends on
        self.data_dir: Path | None = None
        self.fingerprint_record: Path | None = None  # set by check_data_fingerprint; written at the first batch
        self._iters = {s: streams[s].windows(self.positions[s]) for s in self.species}

    def batches(self, batch_size: int, n_batches: int, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """Batches `skip`..`n_batches` of `epoch` (same species sequence on every rank; skipped ones draw no window)."""
        if self.fingerprint_record is not None:  # training has started: record what its checkpoints depend on
            write_fingerprint(self.fingerprint_record, self.fingerprint)
            self.fingerprint_record = None
        rng = np.random.default_rng([self.seed, epoch])
        for _ in range(skip):  # replay the species draws of batches done before a mid-epoch resume
            rng.choice(len(self.species), size=batch_size, p=self.probs)
        for _ in range(n_batches - skip):
            picks = rng.choice(len(self.species), size=batch_size, p=self.probs)
            rows = []
            for pick in picks:
                name = self.species[pick]
                rows.append(next(self._iters[name]))
                self.positions[name] += self.world_size
            windows = torch.from_numpy(np.stack(rows).astype(np.int64))
            yield Batch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), torch.from_numpy(picks))


def build_mixture(
    data_dir: str | Path,
    species_distribution: dict[str, float],
    default_weight: float,
    context_size: int,
    overlap_ratio: float,
    chunk_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    positions: dict[str, int] | None = None,
) -> SpeciesMixture:
    """Discover species under `data_dir`, check the settings and that every species has a window, and return the
    weighted mixture of their streams."""
    if context_size < 1 or not 0.0 <= overlap_ratio < 1.0:
        raise PlantDataError(f"need context_size >= 1 and 0 <= overlap_ratio < 1, got {context_size}, {overlap_ratio}")
    if (context_size + 1) * KMER > chunk_size:
        raise PlantDataError(
            f"context_size {context_size} needs {(context_size + 1) * KMER} bp per window but "
            f"chunk_size is {chunk_size} bp: no chunk can hold a window"
        )
    files = discover_species(data_dir)
    weights = species_weights(list(files), species_distribution, default_weight)
    streams = {
        name: SpeciesStream(name, paths, context_size, overlap_ratio, chunk_size, rank, world_size)
        for name, paths in files.items()
    }
    for stream in streams.values():  # else an all-N species fails only when first drawn, mid-run
        stream.check_has_window()
    mixture = SpeciesMixture(streams, weights, seed, positions)
    mixture.fingerprint = data_fingerprint(mixture.species, context_size, overlap_ratio, chunk_size)
    mixture.data_dir = Path(data_dir)
    return mixture


# ------------------------------------------------------------------------------------------------------ fingerprints
def tokenizer_sha256() -> str:
    """sha256 of the ids `tokenize` gives the 4096 6-mers in ACGT-lexicographic order (uint16, little-endian).

    Computed through `tokenize` itself, so any change of base order, formula or dtype changes the fingerprint.
    """
    digits = (np.arange(VOCAB_SIZE)[:, None] >> (2 * np.arange(KMER - 1, -1, -1))) & 3
    text = np.frombuffer(b"ACGT", dtype=np.uint8)[digits].tobytes()
    ids = np.concatenate(tokenize(text)).astype("<u2")
    return hashlib.sha256(ids.tobytes()).hexdigest()


def data_fingerprint(species: list[str], context_size: int, overlap_ratio: float, chunk_size: int) -> dict:
    """What a model trained on this data depends on: tokenizer, window geometry, species -> embedding id."""
    return {
        "format_version": FINGERPRINT_VERSION,
        "tokenizer": {"kmer": KMER, "base_order": "ACGT", "version": TOKENIZER_VERSION, "sha256": tokenizer_sha256()},
        "window_tokens": context_size + 1,
        "stride_tokens": window_stride(context_size, overlap_ratio),
        "overlap_ratio": overlap_ratio,
        "chunk_bp": chunk_size,  # windows never cross a chunk: the window sequence (and resume positions) depend on it
        "species_ids": {name: i for i, name in enumerate(sorted(species))},
    }


def check_data_fingerprint(run_dir: str | Path, mixture: SpeciesMixture, resuming: bool) -> Path:
    """Check `mixture.fingerprint` against `<run_dir>/data_fingerprint.json` when resuming; arrange for it to be recorded.

    A resumed run whose data settings differ from the recorded ones raises PlantDataError in one line naming the
    record, the data dir and every differing key; a run without a record (older version) gets a warning. Nothing is
    written here (start-up creates no file): the mixture writes the record when its first batch is drawn.
    Returns the record's path.
    """
    record = Path(run_dir) / FINGERPRINT_FILE
    fingerprint = mixture.fingerprint
    if resuming and record.is_file():
        detail = recorded_differences(record, fingerprint, PlantDataError)
        if detail:
            raise PlantDataError(
                f"{record}: the checkpoints were trained on other data settings than {mixture.data_dir} now gives "
                f"({detail}); use the original settings or a new output_dir"
            )
    elif resuming:
        log.warning("%s: missing (checkpoint from an older version): data settings not checked", record)
    mixture.fingerprint_record = record
    return record


def write_fingerprint(record: Path, fingerprint: dict) -> None:
    """Write the record atomically (every rank writes the same bytes; the rename keeps readers from half a file)."""
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{record.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    os.replace(tmp, record)
