"""Encode record shards into the flat token arrays the trainer memory-maps.

    python -m preprocessing.encode_shards data/records/genbank_*.tsv.gz --source genbank \
        --tokenizer data/tokenizer.model --base_dir data/encoded

Writes `<base_dir>/{train,val}/<source>/tokens.bin` (uint16, or uint32 above 65,536 pieces), `offsets.bin`
(int64 record starts, n_records + 1 values) and `meta.json`, and copies the tokenizer to
`<base_dir>/tokenizer.model`. A record goes to val when the hash of its id falls under --val_fraction, so the split
is stable across reruns. Output is written into a temp folder and moved into place only when complete.
`meta.json` records what the trainer depends on (format version, tokenizer sha256, vocab size, special ids, the
record layout); data.check_fingerprint compares it with the tokenizer given to training.
The shards are cut into blocks of whole lines that `--num_proc` workers tokenize; blocks are written in input
order, so the arrays are byte-identical for any process count.
"""

import argparse
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from errors import PreprocessError, run_cli
from preprocessing.parallel import default_num_proc, ordered_map, record_blocks
from preprocessing.shards import parse_shard_line, remove_empty_dirs
from tokenizer import OmniTokenizer

SPLITS = ("train", "val")
FORMAT_VERSION = 2  # 2: meta.json records special ids, layout and this version (1: tokenizer sha256 and counts)
ENCODE_CHUNK_LENGTH = 100_000  # residues per sentencepiece call (OmniTokenizer.encode); recorded in meta.json
_TOKENIZERS: dict[str, OmniTokenizer] = {}  # per process: loaded once, inherited by forked workers


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (identifies the tokenizer a token array was made with)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_val_record(record_id: str, val_fraction: float) -> bool:
    """Stable train/val assignment from the record id alone."""
    digest = hashlib.blake2b(record_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


class _SplitWriter:
    """Streams token ids and record offsets of one split to disk."""

    def __init__(self, folder: Path, dtype: np.dtype):
        folder.mkdir(parents=True)
        self.folder, self.dtype = folder, dtype
        # both stay open while records stream in; close() ends them
        self.tokens = open(folder / "tokens.bin", "wb")  # noqa: SIM115
        self.offsets = open(folder / "offsets.bin", "wb")  # noqa: SIM115
        self.offsets.write(np.zeros(1, dtype=np.int64).tobytes())
        self.n_tokens = self.n_records = 0
        self.modality_records: dict[str, int] = {}

    def add_block(self, tokens: np.ndarray, lengths: np.ndarray, modality_records: dict[str, int]) -> None:
        """Append a block's records: tokens back to back, and their lengths (int64)."""
        self.tokens.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.offsets.write((self.n_tokens + np.cumsum(lengths, dtype=np.int64)).tobytes())
        self.n_tokens += int(lengths.sum())
        self.n_records += len(lengths)
        for modality, count in modality_records.items():
            self.modality_records[modality] = self.modality_records.get(modality, 0) + count

    def close(self, meta: dict) -> None:
        self.tokens.close()
        self.offsets.close()
        meta = dict(meta, n_tokens=self.n_tokens, n_records=self.n_records, modality_records=self.modality_records)
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def encode_block(path, first_line: int, block: bytes, tokenizer_file: str, val_fraction: float) -> dict:
    """{split: (tokens, record lengths, {modality: records})} of one block of shard lines (a worker's unit)."""
    tokenizer = _TOKENIZERS.get(tokenizer_file) or _TOKENIZERS.setdefault(tokenizer_file, OmniTokenizer(tokenizer_file))
    try:
        lines = block.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise PreprocessError(f"{path}: not UTF-8 text after line {first_line}; not a record shard") from None
    records = [parse_shard_line(line, path, first_line + i) for i, line in enumerate(lines, start=1)]
    encoded: list = [None] * len(records)
    for modality in {m for m, _, _ in records}:
        chosen = [i for i, (m, _, _) in enumerate(records) if m == modality]
        ids = tokenizer.encode(modality, [records[i][2] for i in chosen], chunk_length=ENCODE_CHUNK_LENGTH)
        for i, record_ids in zip(chosen, ids):
            encoded[i] = record_ids
    out = {}
    for split in SPLITS:
        members = [i for i, (_, rid, _) in enumerate(records) if (split == "val") == is_val_record(rid, val_fraction)]
        counts: dict[str, int] = {}
        for i in members:
            counts[records[i][0]] = counts.get(records[i][0], 0) + 1
        lengths = np.array([len(encoded[i]) for i in members], np.int64)
        tokens = np.fromiter(itertools.chain.from_iterable(encoded[i] for i in members), np.int64, int(lengths.sum()))
        out[split] = (tokens, lengths, counts)
    return out


def split_meta(tokenizer: OmniTokenizer, source: str, val_fraction: float) -> dict:
    """What a consumer of the token arrays depends on (checked by data.check_fingerprint)."""
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.sha256,
        "special_ids": tokenizer.special_id_map(),
        "record_layout": "<modality> pieces </s>",
        "encode_chunk_length": ENCODE_CHUNK_LENGTH,
        "val_fraction": val_fraction,
    }


def encode_shards(
    shard_paths,
    tokenizer_file: str | Path,
    base_dir: str | Path,
    source: str,
    val_fraction: float = 0.01,
    num_proc: int = 1,
) -> dict[str, dict]:
    """Encode all records of the shards into train/val token arrays for one source; returns each split's meta."""
    base_dir = Path(base_dir)
    tokenizer = _TOKENIZERS[str(tokenizer_file)] = OmniTokenizer(tokenizer_file)
    for split in SPLITS:
        if (base_dir / split / source).exists():
            raise PreprocessError(f"{base_dir / split / source}: already exists; use another --source or --base_dir")
    kept_tokenizer = base_dir / "tokenizer.model"
    if kept_tokenizer.exists() and file_sha256(kept_tokenizer) != tokenizer.sha256:
        raise PreprocessError(f"{kept_tokenizer}: a different tokenizer already encoded data in this --base_dir")
    made = [p for p in (base_dir, *base_dir.parents) if not p.exists()]
    base_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-encode-{source}-", dir=base_dir))
    try:
        writers = {split: _SplitWriter(tmp / split, token_dtype(tokenizer.vocab_size)) for split in SPLITS}
        work = partial(encode_block, tokenizer_file=str(tokenizer_file), val_fraction=val_fraction)
        units = ((path, first, block) for path in shard_paths for first, block in record_blocks(path, b""))
        for result in tqdm(ordered_map(work, units, num_proc), desc=f"encode {source}", unit=" block", disable=None):
            for split, (tokens, lengths, counts) in result.items():
                writers[split].add_block(tokens, lengths, counts)
        n_records = sum(w.n_records for w in writers.values())
        for split, writer in writers.items():
            writer.close(split_meta(tokenizer, source, val_fraction))
            if writer.n_records == 0:
                raise PreprocessError(
                    f"the {split} split of '{source}' is empty ({n_records} records, --val_fraction {val_fraction}):"
                    " change --val_fraction, or cut long records into more (preprocess_genbank --split_length)"
                )
        for split in SPLITS:
            (base_dir / split).mkdir(exist_ok=True)
            os.replace(tmp / split, base_dir / split / source)
        if not kept_tokenizer.exists():
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
            os.replace(tmp / "tokenizer.model", kept_tokenizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty_dirs(made)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return {split: json.loads((base_dir / split / source / "meta.json").read_text()) for split in SPLITS}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="record shards (*.tsv.gz)")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece model from train_tokenizer")
    parser.add_argument("--base_dir", required=True, help="output root; the trainer's --base_dir")
    parser.add_argument("--source", required=True, help="name of this data source, e.g. genbank or uniprot")
    parser.add_argument("--val_fraction", type=float, default=0.01)
    parser.add_argument("--num_proc", type=int, default=default_num_proc(), help="worker processes (default: all)")
    args = parser.parse_args(argv)
    metas = encode_shards(args.shards, args.tokenizer, args.base_dir, args.source, args.val_fraction, args.num_proc)
    for split, meta in metas.items():
        print(f"{split}/{args.source}: {meta['n_records']} records, {meta['n_tokens']:,} tokens ({meta['dtype']})")


if __name__ == "__main__":
    sys.exit(run_cli(main))
