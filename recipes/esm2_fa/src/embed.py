"""Protein embeddings from a trained `final_model/` or a published ESM-2 folder: one float32 row per protein.

    python src/embed.py --model outputs/tiny_cpu/final_model --fasta sample_data/val.fasta --output_dir emb/val
    python src/embed.py --model /models/esm2_t33_650M_UR50D --fasta proteins.fasta --output_dir emb/p --per_residue

Writes `<output_dir>/` atomically (a temporary folder renamed when complete):
  embeddings.npy   float32 [n_proteins, hidden]: mean of the last layer over each protein's residues
                   (never <cls>, <eos> or padding)
  ids.txt          one id per line, in FASTA order (the header's first word, without '>'), row i of embeddings.npy
  residues.npy     with --per_residue: float32 [total_residues, hidden], proteins one after another
  offsets.npy      with --per_residue: int64 [n_proteins + 1]; protein i is residues[offsets[i]:offsets[i+1]]
  embed_info.json  what made it: model folder, config/weights digests, FASTA digest, pooling, lengths, dtype
Long proteins are chunked as data_processing.py does (balanced pieces of at most --max_aa_length residues, <cls>
only on the first piece, <eos> only on the last); each piece is embedded on its own and the residue vectors are
concatenated, so a protein's mean is over all its residues. The FASTA goes through the recipe's reader and checks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from biorecipes_shared import atomic_dir, run_cli
from data_processing import FastaError, chunk_protein, pack_batches, read_fasta, tokenize
from model import ESM_VOCAB, PAD_ID, ModelConfigError, load_pretrained, weights_file

DEFAULT_MAX_AA_LENGTH = 1022  # ESM-2's training crop: 1022 residues + <cls> + <eos>
DEFAULT_TOKEN_BUDGET = 16384


@dataclass
class Piece:
    """One chunk of one protein: its tokens and which residues of the protein it covers."""

    protein: int
    tokens: np.ndarray  # int8 token ids incl. <cls>/<eos> where the piece has them
    first_residue: int  # 1 if the piece starts with <cls>, else 0: where its residues start in `tokens`
    n_residues: int


def read_proteins(fasta: Path, max_aa_length: int) -> tuple[list[str], list[int], list[Piece]]:
    """(ids, residue counts, pieces) of a protein FASTA; FastaError (one line) for bad input or a repeated id."""
    ids, lengths, pieces, seen = [], [], [], {}
    for record_no, (header, residues) in enumerate(read_fasta(fasta), start=1):
        protein_id = header[1:].split(" ", 1)[0]
        if not protein_id:
            raise FastaError(f"{fasta}: record {record_no}: empty id")
        if protein_id in seen:
            raise FastaError(f"{fasta}: record {record_no}: id {protein_id!r} repeats record {seen[protein_id]}")
        seen[protein_id] = record_no
        for chunk in chunk_protein(header, residues, max_aa_length):
            pieces.append(Piece(len(ids), tokenize(chunk), int(chunk.bos), len(chunk.residues)))
        ids.append(protein_id)
        lengths.append(len(residues))
    return ids, lengths, pieces


def pad_batch(pieces: list[Piece]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B, L] int64, attention_mask [B, L] int64, residue_mask [B, L] bool) for a list of pieces.

    residue_mask is True exactly on residues: False on <cls>, <eos> and padding (what pooling averages over).
    """
    width = max(len(p.tokens) for p in pieces)
    input_ids = torch.full((len(pieces), width), PAD_ID, dtype=torch.long)
    residue_mask = torch.zeros((len(pieces), width), dtype=torch.bool)
    for row, piece in enumerate(pieces):
        input_ids[row, : len(piece.tokens)] = torch.from_numpy(piece.tokens.astype(np.int64))
        residue_mask[row, piece.first_residue : piece.first_residue + piece.n_residues] = True
    return input_ids, (input_ids != PAD_ID).long(), residue_mask


@torch.no_grad()
def residue_vectors(model, pieces: list[Piece], device: torch.device, bf16: bool) -> list[torch.Tensor]:
    """Last-layer vectors of each piece's residues, float32 [n_residues, hidden] on the CPU, in `pieces` order."""
    input_ids, attention_mask, residue_mask = pad_batch(pieces)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.esm(input_ids.to(device), attention_mask=attention_mask.to(device))[0]
    hidden = hidden.float().cpu()
    return [hidden[row][residue_mask[row]] for row in range(len(pieces))]


def embed_pieces(model, pieces, lengths, token_budget, device, bf16, per_residue: bool):
    """(means float32 [n, hidden], residues float32 [sum(lengths), hidden] or None), batched by token budget."""
    per_protein: list[list[tuple[int, torch.Tensor]]] = [[] for _ in lengths]
    batches = pack_batches([len(p.tokens) for p in pieces], token_budget)
    for batch in tqdm(batches, desc="embedding", unit="batch", file=sys.stderr):
        chosen = [pieces[i] for i in batch]
        for index, vectors in zip(batch, residue_vectors(model, chosen, device, bf16)):
            per_protein[pieces[index].protein].append((index, vectors))
    full = [torch.cat([v for _, v in sorted(parts, key=lambda part: part[0])]) for parts in per_protein]
    means = torch.stack([vectors.mean(dim=0) for vectors in full]).numpy().astype(np.float32)
    residues = torch.cat(full).numpy().astype(np.float32) if per_residue else None
    return means, residues


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_model_dir(model_dir: Path) -> Path:
    """The weights file of a model folder; ModelConfigError (one line) for a folder this reader cannot use."""
    if not (model_dir / "config.json").is_file():
        raise ModelConfigError(f"{model_dir}: no config.json (give a final_model/ or a transformers ESM-2 folder)")
    weights = weights_file(model_dir)
    if weights is None:
        raise ModelConfigError(f"{model_dir}: holds neither model.safetensors nor pytorch_model.bin")
    vocab = model_dir / "vocab.txt"
    if vocab.is_file() and vocab.read_text().split() != ESM_VOCAB:
        raise ModelConfigError(f"{vocab}: not the 33-token ESM-2 vocabulary this reader tokenizes with")
    return weights


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError("--device cuda: no CUDA GPU here")
    return torch.device(name)


def embed(args: argparse.Namespace) -> Path:
    """Read, embed and write; returns the output folder."""
    model_dir, out_dir = Path(args.model), Path(args.output_dir)
    if args.max_aa_length < 1 or args.token_budget < args.max_aa_length + 2:
        raise ModelConfigError(f"--token_budget {args.token_budget} must hold one piece: >= --max_aa_length + 2")
    if out_dir.exists() and not args.overwrite:
        raise FileExistsError(f"{out_dir} already exists; nothing was written (use --overwrite or another folder)")
    weights = check_model_dir(model_dir)
    ids, lengths, pieces = read_proteins(Path(args.fasta), args.max_aa_length)
    device = pick_device(args.device)
    bf16 = device.type == "cuda" and not args.fp32
    model = load_pretrained(model_dir, args.attention).to(device).eval()
    means, residues = embed_pieces(model, pieces, lengths, args.token_budget, device, bf16, args.per_residue)
    info = {
        "model": str(model_dir.resolve()),
        "config_sha256": sha256_of(model_dir / "config.json"),
        "weights": weights.name,
        "weights_bytes": weights.stat().st_size,
        "fasta": str(Path(args.fasta).resolve()),
        "fasta_sha256": sha256_of(Path(args.fasta)),
        "n_proteins": len(ids),
        "hidden_size": int(means.shape[1]),
        "pooling": "mean over residues (no <cls>/<eos>/padding), last layer",
        "max_aa_length": args.max_aa_length,
        "long_proteins": "chunked like data_processing.py, residue vectors concatenated",
        "compute_dtype": "bfloat16" if bf16 else "float32",
        "per_residue": bool(args.per_residue),
    }
    with atomic_dir(out_dir, replace=args.overwrite) as tmp:
        np.save(tmp / "embeddings.npy", means)
        (tmp / "ids.txt").write_text("".join(f"{protein_id}\n" for protein_id in ids))
        if residues is not None:
            np.save(tmp / "residues.npy", residues)
            np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        (tmp / "embed_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"{len(ids)} proteins x {means.shape[1]} dims -> {out_dir}/embeddings.npy (+ ids.txt)", flush=True)
    return out_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="final_model/ or a transformers ESM-2 folder")
    parser.add_argument("--fasta", required=True, help="protein FASTA (plain or gzip)")
    parser.add_argument("--output_dir", required=True, help="folder to create (refused if it exists)")
    parser.add_argument("--per_residue", action="store_true", help="also write residues.npy + offsets.npy")
    parser.add_argument("--max_aa_length", type=int, default=DEFAULT_MAX_AA_LENGTH, help="longer: chunked")
    parser.add_argument("--token_budget", type=int, default=DEFAULT_TOKEN_BUDGET, help="rows x longest per batch")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--fp32", action="store_true", help="on GPU, compute in float32 instead of bfloat16")
    parser.add_argument(
        "--attention",
        default="auto",
        help="auto | sdpa | flash_attention_2 | flex_attention | eager | faesm (model.py)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI: bad input (FASTA, model folder, settings) prints one `error:` line and exits 1."""
    return run_cli(lambda: embed(parse_args(argv)), user_errors=(FastaError, ModelConfigError))


if __name__ == "__main__":
    sys.exit(main())
