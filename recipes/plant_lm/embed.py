"""Embed plant genome windows with an exported model: one float32 row per window, with its id.

    python embed.py --model outputs/run/final_model --out embeddings/thaliana sample_data/arabidopsis_thaliana/*.fa.gz

FASTA files are read with the recipe's own reader (`data.stream_chunks`: plain or gzip, streamed in `chunk_size`
chunks; non-ACGT bases split the sequence, as in training) and cut into non-overlapping 6-mer tokens. Each ACGT run
is covered by windows of `context_size` tokens starting every `stride` tokens (the run's overlap_ratio by default);
the last window of a run may be shorter and is padded. A window's embedding is the mean over its real tokens of the
final-norm hidden states (padding is never pooled; the model is causal, so padding changes nothing before it). The
bucket memory is read as trained and never written.

Outputs, each written atomically: `<out>.npy` (n_windows, d_model) float32 and `<out>.ids.txt`, one id per row:
`<file>:<record>:<start>-<end>`, 0-based half-open base coordinates of the window on the record.
The species embedding used is `--species` (default: the folder name of each file, which must be in the export).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from biorecipes_shared import ConfigError, RunError, atomic_write, check_settings, run_cli
from data import BASE_CODES, INVALID, KMER, PlantDataError, kmer_ids, stream_chunks, window_stride
from export import load_export


def token_runs(chunk: bytes) -> Iterator[tuple[int, np.ndarray]]:
    """(start base in the chunk, 6-mer ids) of every ACGT run — `data.tokenize` with the run starts kept
    (tests/test_embed.py checks the tokens against `tokenize`)."""
    codes = np.frombuffer(chunk.translate(BASE_CODES), dtype=np.uint8)
    invalid = np.flatnonzero(codes == INVALID)
    starts = np.concatenate(([0], invalid + 1))
    stops = np.concatenate((invalid, [len(codes)]))
    for a, b in zip(starts, stops):
        if b - a >= KMER:
            yield int(a), kmer_ids(codes[a:b])


def window_starts(n_tokens: int, window: int, stride: int) -> list[int]:
    """Token starts of windows covering a run of `n_tokens` (the last one may be shorter than `window`)."""
    starts = [0]
    while starts[-1] + window < n_tokens:
        starts.append(starts[-1] + stride)
    return starts


def windows(path: Path, chunk_size: int, window: int, stride: int) -> Iterator[tuple[str, np.ndarray]]:
    """(id, token ids) of every window of one FASTA file, in file order."""
    record, offset = None, 0
    for record_id, chunk in stream_chunks(path, chunk_size):
        if record_id != record:
            record, offset = record_id, 0
        for run_start, tokens in token_runs(chunk):
            for start in window_starts(len(tokens), window, stride):
                piece = tokens[start : start + window]
                begin = offset + run_start + start * KMER
                yield f"{path.name}:{record_id}:{begin}-{begin + len(piece) * KMER}", piece
        offset += len(chunk)


def batches(items: Iterator[tuple[str, np.ndarray, int]], size: int, window: int):
    """(ids, padded ids (b, window) int64, lengths (b,), species (b,)) batches; padding uses token 0."""
    ids, rows, species = [], [], []
    for item_id, tokens, species_id in items:
        ids.append(item_id)
        rows.append(tokens)
        species.append(species_id)
        if len(ids) == size:
            yield _pack(ids, rows, species, window)
            ids, rows, species = [], [], []
    if ids:
        yield _pack(ids, rows, species, window)


def _pack(ids, rows, species, window):
    padded = np.zeros((len(rows), window), dtype=np.int64)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    lengths = torch.tensor([len(row) for row in rows])
    return ids, torch.from_numpy(padded), lengths, torch.tensor(species)


@torch.no_grad()
def embed_windows(model, items, batch_size: int, window: int, device: torch.device) -> tuple[list[str], np.ndarray]:
    """All ids and the (n, d_model) float32 matrix; bf16 autocast on CUDA."""
    all_ids, rows = [], []
    for ids, tokens, lengths, species in tqdm(batches(items, batch_size, window), desc="embedding", unit="batch"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pooled = model.pooled_embedding(tokens.to(device), species.to(device), lengths.to(device))
        all_ids += ids
        rows.append(pooled.float().cpu())
    if not rows:
        raise PlantDataError("no window: every file is empty, all-N or shorter than one 6-mer")
    return all_ids, torch.cat(rows).numpy().astype(np.float32, copy=False)


def write_outputs(out: Path, matrix: np.ndarray, ids: list[str]) -> tuple[Path, Path]:
    npy, ids_path = out.with_name(out.name + ".npy"), out.with_name(out.name + ".ids.txt")
    with atomic_write(npy, "wb") as handle:
        np.save(handle, matrix)
    with atomic_write(ids_path) as handle:
        handle.write("".join(f"{i}\n" for i in ids))
    return npy, ids_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fasta", nargs="+", type=Path, help="FASTA files (plain or gzip)")
    parser.add_argument("--model", type=Path, required=True, help="a final_model/ folder of this recipe")
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes OUT.npy and OUT.ids.txt")
    parser.add_argument("--species", default=None, help="species of every file (default: each file's folder name)")
    parser.add_argument("--overlap_ratio", type=float, default=None, help="default: the export's")
    parser.add_argument("--chunk_size", type=int, default=1_200_000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:N]")
    return parser.parse_args(argv)


def species_of(path: Path, args: argparse.Namespace, species: list[str]) -> int:
    name = args.species or path.resolve().parent.name
    if name not in species:
        raise ConfigError(f"{path}: species {name!r} is not one the model was trained on ({species}); use --species")
    return species.index(name)


def embed(argv: list[str] | None = None) -> tuple[Path, Path]:
    args = parse_args(argv)
    check_settings([
        ("--batch_size", args.batch_size, "count"),
        ("--chunk_size", args.chunk_size, "count"),
        ("--overlap_ratio", 0.0 if args.overlap_ratio is None else args.overlap_ratio, "unit_interval_right_open"),
    ])  # fmt: skip
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    model, record = load_export(args.model, device)
    window = int(record["context_size"])
    stride = window_stride(window, record["overlap_ratio"] if args.overlap_ratio is None else args.overlap_ratio)
    species_ids = {path: species_of(path, args, record["species"]) for path in args.fasta}
    items = (
        (window_id, tokens, species_ids[path])
        for path in args.fasta
        for window_id, tokens in windows(path, args.chunk_size, window, stride)
    )
    ids, matrix = embed_windows(model, items, args.batch_size, window, device)
    npy, ids_path = write_outputs(args.out, matrix, ids)
    print(f"{len(ids)} window embeddings of dimension {matrix.shape[1]}: {npy}, {ids_path}", flush=True)
    return npy, ids_path


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: embed(argv), user_errors=(PlantDataError, RunError))


if __name__ == "__main__":
    sys.exit(main())
