"""Embed genome fragments with an exported embedder: one float32 row per fragment, with its id.

    python embed.py --model runs/sample-…/final_model --out embeddings/val genomes/*.fna.gz

Each genome (a gzipped FASTA, read with the recipe's reader: all-N contigs dropped, a bad file skipped with a
warning) is cut into `--fragments_per_genome` fragments by the training rules (`data.FragmentSampler`: a start drawn
uniformly over every position where `fragment_bp` bases fit in one contig, redrawn when it holds more than
`max_n_fraction` N; half reverse-complemented), then cropped to `--tokens` k-mers. The draws come from one RNG seeded
with (seed, 1000003, 0), the stream of rank 0's validation set, so with a run's validation genomes in split order and
its seed these are exactly the fragments behind its AUC_log.tsv. Defaults come from the export's record.

Outputs, each written atomically: `<out>.npy` (n_fragments, d_model) float32 and `<out>.ids.txt`, one id per row:
`<genome>:<contig>:<start>:<strand>`, start = 0-based first base of the embedded bases on the forward strand of the
contig (they are the `tokens + k - 1` bases read 5'→3' on `strand`). The pooled embedding is the model's own
(padding-masked sum or mean); every fragment has the same length, so nothing is padded.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from biorecipes_shared import ConfigError, RunError, atomic_write, check_settings, run_cli
from data import FragmentSampler, check_crop, reverse_complement_codes
from export import load_export
from preprocess import N_CODE, GenomeSkipped, GtdbDataError, read_genome_contigs

VALIDATION_STREAM = 1_000_003  # the constant data.validation_fragments seeds with, so the fragments match it
SUFFIXES = re.compile(r"(_genomic)?\.(fna|fa|fasta)(\.gz)?$")


@dataclass
class InMemoryIndex:
    """The fields of preprocess.GenomeIndex that FragmentSampler reads, built in memory, plus contig names."""

    directory: str
    accessions: list[str]
    genomes: np.ndarray  # (n_genomes, 3): label, first contig row, number of contigs
    contigs: np.ndarray  # (n_contigs, 2): start in `sequence`, length
    sequence: np.ndarray  # uint8 base codes, every contig back to back
    contig_names: list[str]


def genome_name(path: Path) -> str:
    return SUFFIXES.sub("", path.name)


def read_genomes(paths: list[Path]) -> InMemoryIndex:
    """Decode the genomes in the given order; unreadable ones are skipped with a warning naming file and reason."""
    accessions, genomes, contigs, names, chunks, offset = [], [], [], [], [], 0
    for path in tqdm(paths, desc="reading genomes", unit="genome", disable=len(paths) < 2):
        try:
            genome_contigs = read_genome_contigs(path)
        except GenomeSkipped as reason:
            print(f"warning: {path}: genome skipped: {reason}", file=sys.stderr)
            continue
        genomes.append((len(accessions), len(contigs), len(genome_contigs)))
        accessions.append(genome_name(path))
        for name, codes in genome_contigs:
            contigs.append((offset, codes.size))
            names.append(name)
            chunks.append(codes)
            offset += codes.size
    if not accessions:
        raise GtdbDataError(f"none of the {len(paths)} genome file(s) could be read")
    return InMemoryIndex(
        "(genomes given to embed.py)",
        accessions,
        np.asarray(genomes, dtype=np.int64).reshape(-1, 3),
        np.asarray(contigs, dtype=np.int64).reshape(-1, 2),
        np.concatenate(chunks),
        names,
    )


def sample_with_starts(sampler: FragmentSampler, rng: np.random.Generator, genomes: np.ndarray):
    """`FragmentSampler.sample`, also returning each fragment's offset into `sequence` (same RNG draws, same codes;
    tests/test_embed.py checks that against `sample` itself)."""
    out = np.empty((len(genomes), sampler.fragment_bp), dtype=np.uint8)
    begins = np.empty(len(genomes), dtype=np.int64)
    pending = np.arange(len(genomes))
    for attempt in range(sampler.max_tries):
        begin = sampler.draw_offsets(rng, genomes[pending])
        begins[pending] = begin
        out[pending] = sampler.index.sequence[begin[:, None] + np.arange(sampler.fragment_bp)]
        too_ambiguous = (out[pending] == N_CODE).mean(axis=1) > sampler.max_n_fraction
        if attempt < sampler.max_tries - 1:
            pending = pending[too_ambiguous]
        if pending.size == 0:
            break
    return out, begins


def cut_fragments(index: InMemoryIndex, settings: dict, tokenizer) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """(tokens (n, settings['tokens']), ids, genome label per fragment) by the rules in the module docstring."""
    sampler = FragmentSampler(index, settings["fragment_bp"], settings["max_n_fraction"])
    rng = np.random.default_rng([settings["seed"], VALIDATION_STREAM, 0])
    genomes = np.repeat(np.arange(len(sampler)), settings["fragments_per_genome"])
    codes, begins = sample_with_starts(sampler, rng, genomes)
    flip = rng.random(len(genomes)) < 0.5 if settings["reverse_complement"] else np.zeros(len(genomes), dtype=bool)
    codes[flip] = reverse_complement_codes(codes[flip])
    n_bases = settings["tokens"] + tokenizer.k - 1
    tokens = tokenizer.tokens_from_codes(torch.from_numpy(np.ascontiguousarray(codes[:, :n_bases])))
    rows = np.searchsorted(index.contigs[:, 0], begins, side="right") - 1
    starts = begins - index.contigs[rows, 0] + np.where(flip, settings["fragment_bp"] - n_bases, 0)
    labels = sampler.labels[genomes]
    ids = [
        f"{index.accessions[label]}:{index.contig_names[row]}:{start}:{'-' if f else '+'}"
        for label, row, start, f in zip(labels, rows, starts, flip)
    ]
    return tokens, ids, labels


@torch.no_grad()
def embed_tokens(embedder, tokens: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """(n, d_model) float32 pooled embeddings, in batches; bf16 autocast on CUDA."""
    rows = []
    for start in tqdm(range(0, len(tokens), batch_size), desc="embedding", unit="batch"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            rows.append(embedder(tokens[start : start + batch_size].to(device)).float().cpu())
    return torch.cat(rows).numpy().astype(np.float32, copy=False)


def write_outputs(out: Path, matrix: np.ndarray, ids: list[str]) -> tuple[Path, Path]:
    """`<out>.npy` and `<out>.ids.txt`, each under a temporary name until complete."""
    npy, ids_path = out.with_name(out.name + ".npy"), out.with_name(out.name + ".ids.txt")
    with atomic_write(npy, "wb") as handle:
        np.save(handle, matrix)
    with atomic_write(ids_path) as handle:
        handle.write("".join(f"{i}\n" for i in ids))
    return npy, ids_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("genomes", nargs="+", type=Path, help="gzipped genome FASTA files, one genome each")
    parser.add_argument("--model", type=Path, required=True, help="a final_model/ folder of this recipe")
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes OUT.npy and OUT.ids.txt")
    for name, kind in (("fragment_bp", int), ("tokens", int), ("fragments_per_genome", int), ("seed", int)):
        parser.add_argument(f"--{name}", type=kind, default=None, help="default: the export's record")
    parser.add_argument("--max_n_fraction", type=float, default=None, help="default: the export's record")
    parser.add_argument("--reverse_complement", choices=("true", "false"), default=None)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:N]")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace, record: dict) -> dict:
    """Command-line values over the export's fragment record; checked in one place (ConfigError, one line)."""
    settings = dict(record.get("fragments") or {})
    for key in ("fragment_bp", "tokens", "fragments_per_genome", "seed", "max_n_fraction"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.reverse_complement is not None:
        settings["reverse_complement"] = args.reverse_complement == "true"
    missing = {"fragment_bp", "tokens", "fragments_per_genome", "seed", "max_n_fraction"} - set(settings)
    if missing:
        raise ConfigError(f"{args.model}: the export records no {sorted(missing)}: pass them as flags")
    settings.setdefault("reverse_complement", True)
    check_settings([
        ("--fragment_bp", settings["fragment_bp"], "count"),
        ("--tokens", settings["tokens"], "count"),
        ("--fragments_per_genome", settings["fragments_per_genome"], "count"),
        ("--seed", settings["seed"], "count0"),
        ("--max_n_fraction", settings["max_n_fraction"], "fraction"),
        ("--batch_size", args.batch_size, "count"),
    ])  # fmt: skip
    return settings


def embed(argv: list[str] | None = None) -> tuple[Path, Path]:
    args = parse_args(argv)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    embedder, tokenizer, record = load_export(args.model, device)
    settings = settings_from(args, record)
    try:
        check_crop(settings["tokens"], settings["fragment_bp"], tokenizer, "--tokens")
    except GtdbDataError as err:
        raise ConfigError(str(err)) from None
    tokens, ids, _ = cut_fragments(read_genomes(list(args.genomes)), settings, tokenizer)
    matrix = embed_tokens(embedder, tokens, args.batch_size, device)
    npy, ids_path = write_outputs(args.out, matrix, ids)
    print(f"{len(ids)} fragment embeddings of dimension {matrix.shape[1]}: {npy}, {ids_path}", flush=True)
    return npy, ids_path


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: embed(argv), user_errors=(GtdbDataError, RunError))


if __name__ == "__main__":
    sys.exit(main())
