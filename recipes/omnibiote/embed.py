"""Embed the records of a GenBank or FASTA file with a trained (or converted) final_model/.

    python embed.py --model runs/sample/final_model --input proteins.faa.gz --modality protein --output emb
    python embed.py --model runs/sample/final_model --input record.gbk.gz --output emb --pooling first

Writes `<output>.npy` (float32: (records, n_embd), or (records, longest, n_embd) zero-padded for --pooling all) and
`<output>.ids.tsv` (record id, modality, tokens used, whether the record was cut to the model's ctx_len), one row per
record in input order; both under temporary names first, then renamed. Records are batched by a token budget
(longest first, so padding stays small), and padding is never pooled (`OmniBioTA.encode`). On a GPU the forward pass
runs under bf16 autocast; the weights and the rotary tables stay fp32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from biorecipes_shared import ConfigError, atomic_write, check_settings, run_cli
from errors import OmniBioteError
from model import POOLING_METHODS, OmniBioTA
from preprocessing.fasta import parse_fasta_block, read_fasta
from preprocessing.preprocess_genbank import iter_genbank_records, normalise_nucleotides
from preprocessing.shards import open_text
from tokenizer import OmniTokenizer

GENBANK_SUFFIXES = (".gb", ".gbk", ".gbff", ".genbank", ".seq")


def is_genbank(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(GENBANK_SUFFIXES)


def read_genbank(path: Path) -> list[tuple[str, str, str]]:
    """(modality, record id, raw sequence) of every GenBank record; PreprocessError (one line) when there are none."""
    with open_text(path) as handle:
        records = list(iter_genbank_records(handle, path))
    if not records:
        raise OmniBioteError(f"{path}: no GenBank records found (expected LOCUS ... // entries)")
    return records


def read_records(path: Path, modality: str | None) -> list[tuple[str, str, str]]:
    """(record id, modality, normalised sequence) of every record; PreprocessError (one line) for a bad record.

    FASTA goes through the preprocessing reader (the FASTA contract); GenBank through the GenBank reader."""
    if is_genbank(path):
        records = [(rid, mod, raw) for mod, rid, raw in read_genbank(path)]
    else:
        if modality is None:
            raise ConfigError(f"{path}: a FASTA input needs --modality dna, rna or protein")
        records = [(rid, modality, sequence) for rid, _title, sequence in read_fasta(path)]
    out = []
    for rid, mod, raw in records:
        where = f"{path}: record {rid}"
        if mod == "protein":  # the FASTA reader's residue check, for protein records of a GenBank file too
            sequence = parse_fasta_block(path, 1, f">{rid}\n{raw}\n".encode())[0][0][2]
        else:
            sequence = normalise_nucleotides(raw, mod, where)
        out.append((rid, mod, sequence))
    return out


def token_batches(lengths: list[int], tokens_per_batch: int) -> list[list[int]]:
    """Record indices grouped longest first so that rows x longest row <= tokens_per_batch (at least one row)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and longest * (len(current) + 1) > tokens_per_batch:
            batches.append(current)
            current = []
        current.append(index)
    return batches + ([current] if current else [])


@torch.no_grad()
def embed_ids(
    model: OmniBioTA, ids: list[list[int]], pooling: str, tokens_per_batch: int, device: torch.device
) -> np.ndarray:
    """Embeddings of token-id lists, in input order: float32 (N, n_embd), or (N, longest, n_embd) for "all"."""
    pad = model.config.pad_id
    longest = max(len(row) for row in ids)
    shape = (len(ids), longest, model.config.n_embd) if pooling == "all" else (len(ids), model.config.n_embd)
    out = np.zeros(shape, dtype=np.float32)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    for batch in tqdm(token_batches([len(r) for r in ids], tokens_per_batch), desc="embedding", unit="batch"):
        rows = [torch.tensor(ids[i]) for i in batch]
        input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad).to(device)
        with autocast:
            pooled = model.encode(input_ids, pooling).float().cpu().numpy()
        for slot, index in enumerate(batch):
            if pooling == "all":
                out[index, : pooled.shape[1]] = pooled[slot]
            else:
                out[index] = pooled[slot]
    return out


def write_outputs(prefix: Path, matrix: np.ndarray, rows: list[tuple[str, str, int, bool]]) -> tuple[Path, Path]:
    """`<prefix>.npy` and `<prefix>.ids.tsv`, each atomically (temporary name, then rename)."""
    npy, tsv = prefix.with_name(prefix.name + ".npy"), prefix.with_name(prefix.name + ".ids.tsv")
    with atomic_write(npy, "wb") as handle:
        np.save(handle, matrix)
    with atomic_write(tsv) as handle:
        handle.write("id\tmodality\tn_tokens\ttruncated\n")
        handle.writelines(f"{rid}\t{mod}\t{n}\t{int(cut)}\n" for rid, mod, n, cut in rows)
    return npy, tsv


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device here")
    return torch.device(name)


def embed_file(args: argparse.Namespace) -> tuple[Path, Path]:
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {model_dir}: no config.json (give a final_model/ folder)")
    tokenizer = OmniTokenizer(args.tokenizer or model_dir / "tokenizer.model")
    device = pick_device(args.device)
    model = OmniBioTA.from_pretrained(model_dir).to(device).eval()
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ConfigError(
            f"{tokenizer.model_file}: {tokenizer.vocab_size} pieces, the model has {model.config.vocab_size}"
        )
    records = read_records(Path(args.input), args.modality)
    ctx_len = model.config.ctx_len
    ids, rows = [], []
    for rid, mod, sequence in records:
        (encoded,) = tokenizer.encode(mod, [sequence])
        cut = len(encoded) > ctx_len
        ids.append(encoded[:ctx_len])
        rows.append((rid, mod, len(ids[-1]), cut))
    if any(cut for *_, cut in rows):
        print(f"warning: {sum(c for *_, c in rows)} record(s) cut to ctx_len {ctx_len} tokens", file=sys.stderr)
    matrix = embed_ids(model, ids, args.pooling, args.tokens_per_batch, device)
    return write_outputs(Path(args.output), matrix, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="final_model/ folder (config.json, model.safetensors)")
    parser.add_argument("--input", required=True, help="GenBank (.gb/.gbk/.gbff[.gz]) or FASTA file")
    parser.add_argument("--modality", choices=("dna", "rna", "protein"), help="for FASTA input (GenBank says itself)")
    parser.add_argument("--output", required=True, help="output prefix: <prefix>.npy and <prefix>.ids.tsv")
    parser.add_argument("--pooling", choices=POOLING_METHODS, default="mean")
    parser.add_argument("--tokens_per_batch", type=int, default=16384, help="rows x longest row per forward pass")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece model (default: <model>/tokenizer.model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    check_settings([("--tokens_per_batch", args.tokens_per_batch, "count")])
    npy, tsv = embed_file(args)
    print(f"wrote {npy} and {tsv}")


if __name__ == "__main__":
    sys.exit(run_cli(main, user_errors=(OmniBioteError,)))
