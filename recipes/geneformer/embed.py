"""Cell embeddings from a trained (or published) Geneformer: one float32 row per cell.

    python embed.py runs/l0_sanity/final_model sample_data/cells.parquet --out emb.npy          # + emb.ids.txt
    python embed.py MODEL sample_data/pbmc500_counts.h5ad --vocab sample_data/vocab.txt \\
        --gene-medians sample_data/gene_medians.json --out emb.parquet                          # cell_id + embedding

Input: tokenized cells (a parquet file or a folder of them, or a Hugging Face `datasets` folder from
`save_to_disk`, each with an `input_ids` column; ids from `cell_id` if present, else the row number), or an
`.h5ad` of raw counts tokenized here with preprocess.py's functions and the given vocabulary and gene medians.
Pooling: the mean of the gene-token states of one layer (`--layer`, default -2: the second to last, as the
original's EmbExtractor; 0 is the embedding layer, -1 the last), never counting padding or special tokens; or the
`<cls>` state (`--pool cls`, V2 models). The special tokens come from --vocab, else the model folder's vocab.txt,
else the vocabulary preprocess.py recorded with the cells (one line of error when none says, or they disagree). Cells are batched by a token budget (longest first) on CPU or GPU (bf16
autocast on GPU); the output rows keep the input order. Outputs are written atomically and record the model, layer
and pooling (`.json` beside a `.npy`, schema metadata in a parquet).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from biorecipes_shared import ConfigError, atomic_write, run_cli
from corpus import fingerprint, list_shards, read_shard_metadata
from model import BertForMaskedLM, geneformer_config
from preprocess import CLS, DataError, read_gene_medians, read_vocab, tokenize_file
from pretrained import check_folder_vocab, load_folder_weights, read_folder_config

CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act")
CONFIG_KEYS += ("max_position_embeddings", "layer_norm_eps", "type_vocab_size", "pad_token_id")


@dataclass
class Cells:
    """Tokenized cells and their ids, in input order."""

    tokens: list[np.ndarray]
    ids: list[str]
    source: str


def load_model(folder: str | Path) -> BertForMaskedLM:
    """A final_model/ of this recipe or a published Hugging Face BertForMaskedLM folder, in eval mode on CPU."""
    folder = Path(folder)
    config = read_folder_config(folder)
    kwargs = {key: config[key] for key in CONFIG_KEYS if key in config}
    model = BertForMaskedLM(geneformer_config(config["vocab_size"], **kwargs))
    load_folder_weights(model, folder)
    return model.eval()


def _token_table(path: Path) -> pa.Table:
    if path.is_file():
        return pq.read_table(path)
    if (path / "state.json").is_file():  # datasets' save_to_disk: Arrow stream files listed in state.json
        files = [path / f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
        return pa.concat_tables(pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files)
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise DataError(f"{path}: no parquet files and no datasets state.json")
    return pa.concat_tables(pq.read_table(f) for f in files)


def read_tokenized(path: str | Path, vocab_size: int) -> Cells:
    """Cells of a token parquet / parquet folder / datasets folder; DataError (one line) for anything unusable."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    try:
        table = _token_table(path)
    except (pa.ArrowException, OSError, ValueError, KeyError) as error:
        raise DataError(f"{path}: not readable as tokenized cells ({str(error).splitlines()[0]})") from None
    if "input_ids" not in table.column_names:
        raise DataError(f"{path}: no 'input_ids' column (has {table.column_names}); tokenize with preprocess.py")
    column = table.column("input_ids")
    if not pa.types.is_list(column.type) or not pa.types.is_integer(column.type.value_type):
        raise DataError(f"{path}: 'input_ids' is {column.type}, not a list of integer token ids per cell")
    tokens = [np.asarray(cell, dtype=np.int64) for cell in column.to_pylist()]
    for row, cell in enumerate(tokens):
        if cell.size == 0 or cell.min() < 0 or cell.max() >= vocab_size:
            raise DataError(
                f"{path}: row {row} is empty or has a token id outside the model's vocabulary ({vocab_size})"
            )
    ids = [str(i) for i in table.column("cell_id").to_pylist()] if "cell_id" in table.column_names else None
    return Cells(tokens, ids or [str(i) for i in range(len(tokens))], str(path))


def tokenize_h5ad(path: str | Path, vocab: list[str], gene_medians: dict[str, float], max_length: int) -> Cells:
    """Rank-value encode an h5ad of raw counts with the recipe's preprocessing (V2 style when the vocab has <cls>)."""
    cells, ids = tokenize_file(path, vocab, gene_medians, max_length, "v2" if CLS in vocab else "v1")
    return Cells([c.astype(np.int64) for c in cells], [str(i) for i in ids], str(path))


def token_budget_batches(lengths: list[int], tokens_per_batch: int) -> list[list[int]]:
    """Cell indices grouped longest first so that rows × longest row ≤ tokens_per_batch (a longer cell goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for index in order:
        width = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1) * width > tokens_per_batch:
            batches.append(current)
            current = []
        current.append(index)
    return batches + ([current] if current else [])


def pooled_states(
    model: BertForMaskedLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keep: torch.Tensor,
    layer: int,
    pool: str,
) -> torch.Tensor:
    """[batch, hidden] float32: the mean over `keep` positions of layer `layer`'s states, or position 0 for cls.

    input_ids/attention_mask/keep: [batch, length]; layer in 0..N indexes [embeddings, layer 1, …, layer N]."""
    encoder = model.bert
    mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
    hidden = encoder.embeddings(input_ids)
    for block in list(encoder.encoder["layer"])[:layer]:
        hidden = block(hidden, mask)
    hidden = hidden.float()
    if pool == "cls":
        return hidden[:, 0]
    weights = keep.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def embed_cells(
    model: BertForMaskedLM,
    cells: Cells,
    layer: int = -2,
    pool: str = "mean",
    tokens_per_batch: int = 16384,
    device: str | torch.device = "cpu",
    special_ids: list[int] | None = None,
    progress: bool = True,
) -> np.ndarray:
    """[n_cells, hidden_size] float32 embeddings in input order. Raises ConfigError for an impossible layer/pool."""
    n_layers = model.config.num_hidden_layers
    if not -(n_layers + 1) <= layer <= n_layers:
        raise ConfigError(f"--layer {layer}: the model has layers 0..{n_layers} (or -1..-{n_layers + 1})")
    depth = layer % (n_layers + 1)
    device = torch.device(device)
    model = model.to(device)
    width_cap = model.config.max_position_embeddings
    tokens = [cell[:width_cap] for cell in cells.tokens]
    special = torch.tensor(sorted(special_ids or []), dtype=torch.long, device=device)
    out = np.zeros((len(tokens), model.config.hidden_size), dtype=np.float32)
    bar = tqdm(total=len(tokens), desc="embedding", unit="cell", disable=not progress, mininterval=1.0)
    for batch in token_budget_batches([len(t) for t in tokens], tokens_per_batch):
        width = max(len(tokens[i]) for i in batch)
        input_ids = torch.full((len(batch), width), model.config.pad_token_id or 0, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            input_ids[row, : len(tokens[index])] = torch.from_numpy(tokens[index])
            attention_mask[row, : len(tokens[index])] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        keep = attention_mask.bool() & ~torch.isin(input_ids, special)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        with torch.no_grad(), autocast:
            pooled = pooled_states(model, input_ids, attention_mask, keep, depth, pool)
        out[batch] = pooled.cpu().numpy()
        bar.update(len(batch))
    bar.close()
    return out


def write_embeddings(out: str | Path, ids: list[str], matrix: np.ndarray, record: dict) -> list[Path]:
    """`.npy` (+ `.ids.txt`, `.json`) or `.parquet` (cell_id, embedding), each written atomically; returns paths."""
    out = Path(out)
    if out.suffix == ".parquet":
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel(), pa.float32()), matrix.shape[1])
        table = pa.table({"cell_id": pa.array(ids, pa.string()), "embedding": vectors})
        table = table.replace_schema_metadata({"biorecipes": json.dumps(record)})
        with atomic_write(out, "wb") as handle:
            pq.write_table(table, handle)
        return [out]
    if out.suffix != ".npy":
        raise ConfigError(f"--out {out}: use a .npy or .parquet name")
    ids_path, record_path = out.with_suffix(".ids.txt"), out.with_suffix(".json")
    with atomic_write(out, "wb") as handle:
        np.save(handle, matrix)
    with atomic_write(ids_path) as handle:
        handle.write("\n".join(ids) + "\n")
    with atomic_write(record_path) as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
    return [out, ids_path, record_path]


def recorded_corpus(path: Path) -> dict | None:
    """The fingerprint preprocess.py records in every shard of a token corpus (corpus.py): vocabulary sha256 and
    size, style, special-token ids. None for cells without one (a `datasets` folder, another tool's parquet);
    DataError for a folder mixing shards of different corpora."""
    if path.suffix == ".h5ad" or (path.is_dir() and (path / "state.json").is_file()):
        return None
    records = [read_shard_metadata(shard) for shard in list_shards(path)]
    known = [record for record in records if record is not None]
    if not known:
        return None
    if len(known) < len(records) or any(fingerprint(r) != fingerprint(known[0]) for r in known):
        raise DataError(f"{path}: its shards come from different corpora (or some lack the preprocessing metadata)")
    return known[0]


def vocab_sha256(tokens: list[str]) -> str:
    """The digest preprocess.py records: of the vocab.txt it writes, whatever file the tokens were read from."""
    return hashlib.sha256(("\n".join(tokens) + "\n").encode()).hexdigest()


def special_token_ids(cells: str, vocab: list[str] | None, vocab_source, record: dict | None) -> dict[str, int]:
    """{token: id} of the special tokens, which never enter a mean: from the vocabulary when there is one (it must be
    the one the corpus records), else from the corpus' record. Guessing (e.g. only ids 0 and 1) would silently pool
    V2's <cls>/<eos> into every cell, so without either this is a ConfigError."""
    if vocab is not None:
        if record is not None and record.get("vocab_sha256") != vocab_sha256(vocab):
            raise DataError(
                f"{cells} was tokenized with another vocabulary ({record.get('vocab_size')} tokens, sha256 "
                f"{str(record.get('vocab_sha256'))[:12]}) than {vocab_source} ({len(vocab)} tokens, sha256 "
                f"{vocab_sha256(vocab)[:12]}); embed cells tokenized with the model's vocabulary"
            )
        return {token: i for i, token in enumerate(vocab) if token.startswith("<") and token.endswith(">")}
    if record is not None:
        return {str(token): int(i) for token, i in record["special_token_ids"].items()}
    raise ConfigError(
        f"{cells}: these cells record no vocabulary (not written by preprocess.py) and none was given, so the special "
        "token ids (<pad>, <mask>, <cls>, <eos>) are unknown; give --vocab (the model's vocab.txt or token_dictionary.pkl)"
    )


def read_cells(args: argparse.Namespace, model: BertForMaskedLM) -> tuple[Cells, dict[str, int]]:
    """The input cells and the special tokens to leave out of the mean ({token: id})."""
    # The model folder's own vocab.txt is read here first, so that a garbled one is a one-line DataError.
    folder_vocab_path = Path(args.model) / "vocab.txt"
    folder_vocab = read_vocab(folder_vocab_path) if folder_vocab_path.is_file() else None
    vocab = read_vocab(args.vocab) if args.vocab else None
    if vocab is not None:
        check_folder_vocab(args.model, vocab, args.vocab, model.config.vocab_size)
    if Path(args.cells).suffix == ".h5ad":
        if vocab is None or not args.gene_medians:
            raise ConfigError(f"{args.cells}: an h5ad is tokenized here: give --vocab and --gene-medians")
        max_length = args.max_length or model.config.max_position_embeddings
        cells = tokenize_h5ad(args.cells, vocab, read_gene_medians(args.gene_medians), max_length)
    else:
        cells = read_tokenized(args.cells, model.config.vocab_size)
    source = args.vocab if vocab is not None else folder_vocab_path
    record = recorded_corpus(Path(args.cells))
    special = special_token_ids(args.cells, vocab or folder_vocab, source, record)
    if args.pool == "cls" and (CLS not in special or any(cell[0] != special[CLS] for cell in cells.tokens)):
        raise ConfigError(f"--pool cls needs V2 cells (a vocabulary with {CLS}) that all start with {CLS}")
    return cells, special


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="final_model/ of a training run, or a published BertForMaskedLM folder")
    parser.add_argument("cells", help="tokenized cells (parquet file/folder, datasets folder) or an .h5ad of counts")
    parser.add_argument("--out", required=True, help="NAME.npy (+ NAME.ids.txt, NAME.json) or NAME.parquet")
    parser.add_argument("--layer", type=int, default=-2, help="0 = embeddings, -1 = last layer; default -2")
    parser.add_argument("--pool", choices=("mean", "cls"), default="mean")
    parser.add_argument(
        "--vocab",
        help="vocab.txt or token_dictionary.pkl of the model (needed for .h5ad input and for cells that record none)",
    )
    parser.add_argument("--gene-medians", help="gene_medians.json (for .h5ad input)")
    parser.add_argument("--max-length", type=int, help="tokens per cell for .h5ad input (default: model positions)")
    parser.add_argument("--tokens-per-batch", type=int, default=16384, help="padded tokens per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tokens_per_batch < 1 or (args.max_length is not None and args.max_length < 1):
        raise ConfigError("--tokens-per-batch and --max-length must be at least 1")
    model = load_model(args.model)
    cells, special = read_cells(args, model)
    ids = sorted(special.values())
    matrix = embed_cells(model, cells, args.layer, args.pool, args.tokens_per_batch, args.device, ids)
    record = {"model": str(Path(args.model).resolve()), "cells": cells.source, "layer": args.layer, "pool": args.pool}
    record["special_token_ids"] = special  # left out of the mean
    written = write_embeddings(args.out, cells.ids, matrix, {**record, "shape": list(matrix.shape)})
    print(f"wrote {matrix.shape[0]} × {matrix.shape[1]} embeddings: {', '.join(map(str, written))}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run(argv), user_errors=(DataError,))


if __name__ == "__main__":
    sys.exit(main())
