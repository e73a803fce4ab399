"""Protein FASTA -> token-budget batches in `shard-XXXXX/` HF datasets, plus `<input>_refined.fasta`.

    python src/data_processing.py --input_fasta proteins.fasta.gz --output_dir data/train \
        --chunk_size 10000 --shard_size 50000 --max_aa_length 1022

Steps: stream the FASTA (plain or gzip) -> validate and normalise each record -> split long sequences into
balanced chunks -> tokenize -> sort a window of `chunk_size` proteins (their pieces) by length -> pack greedily so
that rows x longest-row never exceeds the token budget -> write the batches' rows contiguously (batch-major) so the
training loader can rebuild each batch from one slice of a memory-mapped shard. A shard is made from whole
windows (`--shard_size` rows at most when that is below `--chunk_size`; else `shard_size // chunk_size` windows), so
each of the `--num_proc` worker processes writes its own shards and its part of the refined FASTA; the main process
only finds the blocks' boundaries (workers read an uncompressed input themselves) and renames the results in input
order. The output does not depend on the process count.
`packing.json` beside the shards records what a consumer depends on (token budget, lengths, vocabulary sha256,
special ids, format version); data.check_data_fingerprints compares it with the model before training.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import sys
from functools import partial
from pathlib import Path

from datasets.utils.logging import disable_progress_bar
from tqdm import tqdm

from fasta_reader import VALID_RESIDUES, FastaError, read_fasta
from model import CLS_ID, EOS_ID, ESM_VOCAB, MASK_ID, PAD_ID, UNK_ID
from packing import Chunk, chunk_protein, pack_batches, tokenize
from shard_groups import IGNORE_INDEX, append_file, build_group, map_groups, windows_per_group

__all__ = [
    "IGNORE_INDEX",
    "VALID_RESIDUES",
    "Chunk",
    "FastaError",
    "chunk_protein",
    "pack_batches",
    "read_fasta",
    "tokenize",
]

PACKING_FILE = "packing.json"  # next to the shard dirs: what the shards were made with (the consumer checks it)
PACKING_KEYS = ("token_budget", "max_aa_length", "max_position_embeddings")
# 2: packing.json also records the vocabulary sha256, special ids and this version (1: token budget and lengths).
FORMAT_VERSION = 2
SPECIAL_IDS = {"cls": CLS_ID, "pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID, "mask": MASK_ID}


def vocab_sha256(vocab: list[str] = ESM_VOCAB) -> str:
    """sha256 of the vocabulary as `vocab.txt` (one token per line, id order), the file save_tokenizer writes."""
    return hashlib.sha256(("\n".join(vocab) + "\n").encode("utf-8")).hexdigest()


def default_num_proc() -> int:
    """The cores this process may run on (respects taskset/cgroup CPU sets, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    num_proc: int = 1,
) -> dict:
    """Run the whole preprocessing with num_proc processes; the output is byte-identical for any num_proc.

    On any error (FastaError) nothing is left at output_dir and no refined FASTA is written.
    """
    input_fasta, output_dir = Path(input_fasta), Path(output_dir)
    _check_settings(output_dir, chunk_size, shard_size, max_aa_length, token_budget, max_position_embeddings, num_proc)
    disable_progress_bar()  # one tqdm bar for the whole run instead of one per shard
    refined_path = refined_fasta_path(input_fasta)
    tmp_dir = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}")
    tmp_refined = refined_path.with_name(f".{refined_path.name}.partial-{os.getpid()}")
    work = partial(
        build_group, out_dir=tmp_dir, shard_size=shard_size, chunk_size=chunk_size, max_aa_length=max_aa_length,
        token_budget=token_budget, seed=seed,
    )  # fmt: skip
    made = [p for p in output_dir.parents if not p.exists()]  # removed again if the run fails
    try:
        tmp_dir.mkdir(parents=True)
        totals = write_groups(input_fasta, tmp_dir, tmp_refined, chunk_size, shard_size, work, num_proc, progress)
        # Inside tmp_dir, so it appears with the shards in the one rename; the loader checks it against its model.
        packing = packing_record(token_budget, max_aa_length, max_position_embeddings, input_fasta, totals)
        (tmp_dir / PACKING_FILE).write_text(json.dumps(packing, indent=2) + "\n")
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        if output_dir.exists():  # an empty dir the user created: replace it
            output_dir.rmdir()
        tmp_dir.rename(output_dir)
        tmp_refined.replace(refined_path)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        for folder in made:  # deepest first; stops at one that is not empty
            if not folder.exists() or any(folder.iterdir()):
                break
            folder.rmdir()
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_refined.unlink(missing_ok=True)
    return run_summary(totals, refined_path)


def run_summary(totals: dict, refined_path: Path) -> dict:
    """What `preprocess_fasta` returns and the command line prints: counts, padding efficiency, the refined FASTA."""
    return {
        "shards": totals["shards"],
        "batches": totals["batches"],
        "sequences": totals["rows"],
        "real_tokens": totals["real_tokens"],
        "padded_tokens": totals["padded_tokens"],
        "padding_efficiency": totals["real_tokens"] / max(totals["padded_tokens"], 1),
        "refined_fasta": str(refined_path),
    }


def write_groups(
    input_fasta, tmp_dir, tmp_refined, chunk_size, shard_size, work, num_proc, progress
) -> collections.Counter:
    """Build every group of windows (in `num_proc` processes), number their shards in input order inside tmp_dir and
    append their refined FASTA parts to tmp_refined; returns the totals (shards, batches, rows, tokens)."""
    totals = collections.Counter()
    per_group = windows_per_group(chunk_size, shard_size)
    with open(tmp_refined, "wb") as refined, tqdm(desc="proteins", unit=" seq", disable=not progress) as bar:
        for result in map_groups(input_fasta, chunk_size, per_group, work, num_proc):
            for shard in result.shards:  # numbered in input order, whichever worker wrote them
                shard.rename(tmp_dir / f"shard-{totals['shards']:05d}")
                totals["shards"] += 1
            append_file(result.refined, refined)
            result.refined.unlink()
            totals.update(batches=result.batches, rows=result.rows, real_tokens=result.real_tokens)
            totals.update(padded_tokens=result.padded_tokens)
            bar.update(result.n_records)
    return totals


def packing_record(token_budget, max_aa_length, max_position_embeddings, input_fasta: Path, totals) -> dict:
    """packing.json: what a consumer of the shards depends on (checked by data.check_data_fingerprints)."""
    return dict(
        token_budget=token_budget,
        max_aa_length=max_aa_length,
        max_position_embeddings=max_position_embeddings,
        format_version=FORMAT_VERSION,
        vocab_sha256=vocab_sha256(),
        vocab_size=len(ESM_VOCAB),
        special_ids=SPECIAL_IDS,
        input_fasta=input_fasta.name,
        sequences=totals["rows"],
        batches=totals["batches"],
    )


def _check_settings(output_dir, chunk_size, shard_size, max_aa_length, token_budget, positions, num_proc) -> None:
    if max_aa_length + 2 > positions:
        raise FastaError(
            f"--max_aa_length {max_aa_length} + 2 special tokens exceeds the model's max_position_embeddings ({positions})"
        )
    if token_budget < max_aa_length + 2:
        raise FastaError(f"token budget {token_budget} is smaller than one full-length sequence ({max_aa_length + 2})")
    if min(chunk_size, shard_size, max_aa_length, num_proc) < 1:
        raise FastaError("--chunk_size, --shard_size, --max_aa_length and --num_proc must be positive")
    existing = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise FastaError(f"{output_dir}: {existing} exists and is not a directory; choose another --output_dir")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FastaError(f"{output_dir}: output directory exists and is not empty; choose a new one")


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


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: prints a one-line error and returns 1 on bad input."""
    from biorecipes_shared import run_cli
    from config import ConfigError, load

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_fasta", required=True, type=Path, help="protein FASTA, plain or .gz")
    parser.add_argument("--output_dir", required=True, type=Path, help="new dir for shard-XXXXX/ datasets")
    parser.add_argument(
        "--chunk_size", type=int, default=10_000, help="proteins per window (sorted by length together)"
    )
    parser.add_argument("--shard_size", type=int, default=50_000, help="max rows per shard (batches never split)")
    parser.add_argument("--max_aa_length", type=int, default=1022, help="longer proteins are split into pieces")
    parser.add_argument("--token_budget", type=int, default=None, help="default: model.max_batch_size of the config")
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("config.yaml"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch-order shuffle")
    parser.add_argument(
        "--num_proc", type=int, default=default_num_proc(), help="worker processes (default: all usable cores)"
    )
    args = parser.parse_args(argv)

    def run() -> None:
        model_cfg = load(args.config).model
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
            num_proc=args.num_proc,
        )
        print(
            f"wrote {summary['sequences']} sequences in {summary['batches']} batches to {summary['shards']} shards "
            f"in {args.output_dir} (padding efficiency {summary['padding_efficiency']:.3f}); "
            f"refined FASTA: {summary['refined_fasta']}"
        )

    return run_cli(run, user_errors=(FastaError, ConfigError))


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
