"""Protein FASTA -> token-budget batches in `shard-XXXXX/` HF datasets, plus `<input>_refined.fasta`.

    python src/data_processing.py --input_fasta proteins.fasta.gz --output_dir data/train \
        --chunk_size 10000 --shard_size 50000 --max_aa_length 1022

Steps: stream the FASTA (plain or gzip) -> validate and normalise each record -> split long sequences into
balanced chunks -> tokenize -> sort a window of `chunk_size` sequences by length -> pack greedily so that
rows x longest-row never exceeds the token budget -> write the batches' rows contiguously (batch-major) so the
training loader can rebuild each batch from one slice of a memory-mapped shard. `packing.json` beside the shards
records the token budget and lengths used, which train.py checks against its config.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import os
import random
import shutil
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from Bio.SeqIO.FastaIO import SimpleFastaParser
from datasets import Dataset, DatasetInfo, Features, Sequence, Value
from datasets.table import InMemoryTable
from datasets.utils.logging import disable_progress_bar
from tqdm import tqdm

from model import CLS_ID, EOS_ID, ESM_VOCAB, PAD_ID

# Residue letters accepted in input (upper-cased first). Gap symbols '.' and '-' are not protein residues.
VALID_RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO"
_RESIDUE_TO_ID = np.full(256, -1, dtype=np.int8)
for _letter in VALID_RESIDUES:
    _RESIDUE_TO_ID[ord(_letter)] = ESM_VOCAB.index(_letter)
IGNORE_INDEX = -100
PACKING_FILE = "packing.json"  # next to the shard dirs: the token budget and lengths they were packed with
PACKING_KEYS = ("token_budget", "max_aa_length", "max_position_embeddings")

SHARD_FEATURES = Features(
    {
        "input_ids": Sequence(Value("int8")),
        "attention_mask": Sequence(Value("int8")),
        "labels": Sequence(Value("int8")),
        "sequence_length": Value("int32"),
        "batch_id": Value("int64"),
        "id": Value("string"),
    }
)


class FastaError(ValueError):
    """The input FASTA cannot be used; the message names the file, the record and the problem."""


@dataclass
class Chunk:
    """One refined sequence: a whole protein or one piece of a long one."""

    id: str  # FASTA header incl. '>' and, for pieces, a '/start-end' residue range (1-based, inclusive)
    residues: str
    bos: bool  # only the first piece of a protein starts with <cls>
    eos: bool  # only the last piece ends with <eos>


def open_text(path: Path):
    """Open a plain or gzip-compressed text file (detected by its magic bytes, not its name)."""
    with open(path, "rb") as raw:
        magic = raw.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="ascii", errors="replace")
    return open(path, encoding="ascii", errors="replace")


def read_fasta(path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield (header incl. '>', upper-case residues) per record, streaming; raise FastaError on bad input.

    Normalisation (documented): lower case -> upper case, CRLF line ends accepted, one trailing '*' (stop codon)
    stripped. Errors: empty file, text before the first '>', a record without residues, any other character.
    """
    path = Path(path)
    if not path.is_file():
        raise FastaError(f"{path}: no such file")
    n_records = 0
    try:
        with open_text(path) as handle:
            first = next((line for line in handle if line.strip()), None)
            if first is None:
                raise FastaError(f"{path}: empty file, no FASTA records")
            if not first.startswith(">"):
                raise FastaError(f"{path}: line 1 does not start with '>' (not a FASTA file?)")
            for title, seq in SimpleFastaParser(itertools.chain([first], handle)):
                n_records += 1
                header = ">" + title
                yield header, _normalise(path, n_records, header, seq)
    except (EOFError, OSError, zlib.error) as err:
        raise FastaError(f"{path}: truncated or corrupt gzip after record {n_records} ({err})") from err


def _normalise(path: Path, record_no: int, header: str, seq: str) -> str:
    where = f"{path}: record {record_no} ({header[:60]})"
    seq = seq.upper()
    if seq.endswith("*"):
        seq = seq[:-1]
    if not seq:
        raise FastaError(f"{where}: no sequence")
    codes = _RESIDUE_TO_ID[np.frombuffer(seq.encode("ascii", errors="replace"), dtype=np.uint8)]
    bad = np.flatnonzero(codes < 0)
    if bad.size:
        pos = int(bad[0])
        what = "stop codon '*' inside the sequence" if seq[pos] == "*" else f"invalid residue {seq[pos]!r}"
        raise FastaError(f"{where}: {what} at position {pos + 1}")
    return seq


def chunk_protein(header: str, residues: str, max_aa_length: int) -> list[Chunk]:
    """Split a protein longer than max_aa_length into balanced pieces (lengths differ by at most one)."""
    n_pieces = math.ceil(len(residues) / max_aa_length)
    if n_pieces == 1:
        return [Chunk(header, residues, bos=True, eos=True)]
    name, _, description = header.partition(" ")
    base, extra = divmod(len(residues), n_pieces)
    chunks, start = [], 0
    for i in range(n_pieces):
        end = start + base + (1 if i < extra else 0)
        piece_id = f"{name}/{start + 1}-{end}" + (f" {description}" if description else "")
        chunks.append(Chunk(piece_id, residues[start:end], bos=i == 0, eos=i == n_pieces - 1))
        start = end
    return chunks


def tokenize(chunk: Chunk) -> np.ndarray:
    """Token ids (int8) of a chunk: one table look-up over the residue bytes instead of a per-character loop."""
    ids = _RESIDUE_TO_ID[np.frombuffer(chunk.residues.encode("ascii"), dtype=np.uint8)]
    parts = ([np.array([CLS_ID], np.int8)] if chunk.bos else []) + [ids]
    parts += [np.array([EOS_ID], np.int8)] if chunk.eos else []
    return np.concatenate(parts)


def pack_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Greedy packing of length-sorted sequences so that len(batch) * longest <= token_budget; returns indices."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches, current = [], []
    for idx in order:
        if current and (len(current) + 1) * lengths[idx] > token_budget:
            batches.append(current)
            current = []
        current.append(idx)
    if current:
        batches.append(current)
    return batches


class ShardWriter:
    """Accumulates whole batches and writes `shard-XXXXX/` datasets of at most ~shard_size rows."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.rows: list[tuple[np.ndarray, int, int, str]] = []  # (tokens, padded width, batch id, sequence id)
        self.n_shards = self.n_batches = self.n_rows = self.real_tokens = self.padded_tokens = 0

    def add_batch(self, token_arrays: list[np.ndarray], ids: list[str]) -> None:
        width = max(len(t) for t in token_arrays)
        if self.rows and len(self.rows) + len(ids) > self.shard_size:
            self.flush()
        self.rows += [(tokens, width, self.n_batches, seq_id) for tokens, seq_id in zip(token_arrays, ids)]
        self.real_tokens += sum(len(t) for t in token_arrays)
        self.padded_tokens += width * len(ids)
        self.n_batches += 1
        self.n_rows += len(ids)

    def flush(self) -> None:
        if not self.rows:
            return
        # Columns are built as Arrow arrays from one flat numpy buffer each: Dataset.from_dict would encode
        # every row in Python, which made it ~5x slower than everything else in preprocessing together.
        widths = np.array([w for _, w, _, _ in self.rows])
        lengths = np.array([len(t) for t, _, _, _ in self.rows])
        offsets = pa.array(np.concatenate([[0], np.cumsum(widths)]).astype(np.int32))
        real = np.arange(widths.sum()) - np.repeat(offsets.to_numpy()[:-1], widths) < np.repeat(lengths, widths)
        input_ids = np.full(widths.sum(), PAD_ID, np.int8)
        input_ids[real] = np.concatenate([t for t, _, _, _ in self.rows])
        labels = np.where(real, input_ids, IGNORE_INDEX).astype(np.int8)
        table = pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(offsets, pa.array(input_ids)),
                "attention_mask": pa.ListArray.from_arrays(offsets, pa.array(real.astype(np.int8))),
                "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
                "sequence_length": pa.array(lengths.astype(np.int32)),
                "batch_id": pa.array(np.array([b for _, _, b, _ in self.rows], np.int64)),
                "id": pa.array([i for _, _, _, i in self.rows]),
            }
        ).cast(SHARD_FEATURES.arrow_schema)
        shard = Dataset(InMemoryTable(table), info=DatasetInfo(features=SHARD_FEATURES))
        shard.save_to_disk(str(self.out_dir / f"shard-{self.n_shards:05d}"))
        self.n_shards += 1
        self.rows = []


def refined_fasta_path(input_fasta: Path) -> Path:
    """`<input_name>_refined.fasta` next to the input (`.gz` and the FASTA extension dropped from the name)."""
    name = input_fasta.name.removesuffix(".gz")
    for ext in (".fasta", ".fa", ".faa", ".fas", ".fna"):
        name = name.removesuffix(ext)
    return input_fasta.with_name(f"{name}_refined.fasta")


def preprocess_fasta(
    input_fasta: str | Path,
    output_dir: str | Path,
    chunk_size: int,
    shard_size: int,
    max_aa_length: int,
    token_budget: int,
    max_position_embeddings: int,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the whole preprocessing; on any error nothing is left at output_dir and no refined FASTA is written."""
    input_fasta, output_dir = Path(input_fasta), Path(output_dir)
    if max_aa_length + 2 > max_position_embeddings:
        raise FastaError(
            f"--max_aa_length {max_aa_length} + 2 special tokens exceeds the model's "
            f"max_position_embeddings ({max_position_embeddings})"
        )
    if token_budget < max_aa_length + 2:
        raise FastaError(f"token budget {token_budget} is smaller than one full-length sequence ({max_aa_length + 2})")
    if min(chunk_size, shard_size, max_aa_length) < 1:
        raise FastaError("--chunk_size, --shard_size and --max_aa_length must be positive")
    existing = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise FastaError(f"{output_dir}: {existing} exists and is not a directory; choose another --output_dir")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FastaError(f"{output_dir}: output directory exists and is not empty; choose a new one")
    disable_progress_bar()  # one tqdm bar for the whole run instead of one per shard
    refined_path = refined_fasta_path(input_fasta)
    tmp_dir = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    tmp_refined = refined_path.with_name(f".{refined_path.name}.partial-{os.getpid()}")
    rng = random.Random(seed)
    try:
        tmp_dir.mkdir(parents=True)
        writer = ShardWriter(tmp_dir, shard_size)
        with open(tmp_refined, "w") as refined:
            window: list[Chunk] = []
            for header, residues in tqdm(read_fasta(input_fasta), desc="proteins", unit=" seq", disable=not progress):
                for chunk in chunk_protein(header, residues, max_aa_length):
                    refined.write(f"{chunk.id}\n{chunk.residues}\n")
                    window.append(chunk)
                if len(window) >= chunk_size:
                    _write_window(window, writer, token_budget, rng)
                    window = []
            _write_window(window, writer, token_budget, rng)
        writer.flush()
        # Inside tmp_dir, so it appears with the shards in the one rename; train.py checks it against its config.
        packing = dict(
            token_budget=token_budget, max_aa_length=max_aa_length, max_position_embeddings=max_position_embeddings
        )
        (tmp_dir / PACKING_FILE).write_text(json.dumps(packing, indent=2) + "\n")
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        if output_dir.exists():  # an empty dir the user created: replace it
            output_dir.rmdir()
        tmp_dir.rename(output_dir)
        tmp_refined.replace(refined_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_refined.unlink(missing_ok=True)
    return {
        "shards": writer.n_shards,
        "batches": writer.n_batches,
        "sequences": writer.n_rows,
        "real_tokens": writer.real_tokens,
        "padded_tokens": writer.padded_tokens,
        "padding_efficiency": writer.real_tokens / max(writer.padded_tokens, 1),
        "refined_fasta": str(refined_path),
    }


def read_packing(data_dir: str | Path) -> dict | None:
    """The packing.json of a shard dir, or None for shards written before it existed."""
    path = Path(data_dir) / PACKING_FILE
    if not path.is_file():
        return None
    try:
        packing = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(packing, dict) or not all(isinstance(packing.get(k), int) for k in PACKING_KEYS):
        raise ValueError(f"{path}: needs integer {', '.join(PACKING_KEYS)}")
    return packing


def _write_window(window: list[Chunk], writer: ShardWriter, token_budget: int, rng: random.Random) -> None:
    tokens = [tokenize(chunk) for chunk in window]
    batches = pack_batches([len(t) for t in tokens], token_budget)
    # Length-sorted packing would feed short batches first and long ones last; shuffle the batch order instead.
    rng.shuffle(batches)
    for batch in batches:
        writer.add_batch([tokens[i] for i in batch], [window[i].id for i in batch])


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints a one-line error and returns 1 on bad input."""
    from config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_fasta", required=True, type=Path, help="protein FASTA, plain or .gz")
    parser.add_argument("--output_dir", required=True, type=Path, help="new dir for shard-XXXXX/ datasets")
    parser.add_argument("--chunk_size", type=int, default=10_000, help="sequences sorted by length together")
    parser.add_argument("--shard_size", type=int, default=50_000, help="max rows per shard (batches never split)")
    parser.add_argument("--max_aa_length", type=int, default=1022, help="longer proteins are split into pieces")
    parser.add_argument("--token_budget", type=int, default=None, help="default: model.max_batch_size of the config")
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("config.yaml"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch-order shuffle")
    args = parser.parse_args(argv)
    try:
        model_cfg = load_config(args.config).model
        positions = checked_max_positions(model_cfg)
        summary = preprocess_fasta(
            args.input_fasta,
            args.output_dir,
            args.chunk_size,
            args.shard_size,
            args.max_aa_length,
            args.token_budget or model_cfg.max_batch_size,
            positions,
            args.seed,
        )
    except (FastaError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {summary['sequences']} sequences in {summary['batches']} batches to {summary['shards']} shards "
        f"in {args.output_dir} (padding efficiency {summary['padding_efficiency']:.3f}); "
        f"refined FASTA: {summary['refined_fasta']}"
    )
    return 0


def checked_max_positions(model_cfg) -> int:
    """The config's max_position_embeddings after checking it against the model architecture."""
    from config import ConfigError
    from model import ModelConfigError, esm2_config

    try:
        return esm2_config(model_cfg.model_name, model_cfg.max_position_embeddings).max_position_embeddings
    except ModelConfigError as err:
        raise ConfigError(str(err)) from err


if __name__ == "__main__":
    sys.exit(main())
