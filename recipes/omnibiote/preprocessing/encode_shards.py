"""Encode record shards into the flat token arrays the trainer memory-maps.

    python -m preprocessing.encode_shards data/records/genbank_*.tsv.gz --source genbank \
        --tokenizer data/tokenizer.model --base_dir data/encoded

Writes `<base_dir>/{train,val}/<source>/tokens.bin` (uint16, or uint32 above 65,536 pieces), `offsets.bin`
(int64 record starts, n_records + 1 values) and `meta.json`, and copies the tokenizer to
`<base_dir>/tokenizer.model`. A record goes to val when the hash of its id falls under --val_fraction, so the split
is stable across reruns. Output is written into a temp folder and moved into place only when complete.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from errors import PreprocessError, run_cli
from preprocessing.shards import iter_shard_records
from tokenizer import OmniTokenizer

SPLITS = ("train", "val")


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

    def add(self, modality: str, ids: list[int]) -> None:
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.n_tokens += len(ids)
        self.n_records += 1
        self.offsets.write(np.array([self.n_tokens], dtype=np.int64).tobytes())
        self.modality_records[modality] = self.modality_records.get(modality, 0) + 1

    def close(self, meta: dict) -> None:
        self.tokens.close()
        self.offsets.close()
        meta = dict(meta, n_tokens=self.n_tokens, n_records=self.n_records, modality_records=self.modality_records)
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def encode_shards(
    shard_paths,
    tokenizer_file: str | Path,
    base_dir: str | Path,
    source: str,
    val_fraction: float = 0.01,
    batch_records: int = 256,
    num_threads: int = 1,
) -> dict[str, dict]:
    """Encode all records of the shards into train/val token arrays for one source; returns each split's meta."""
    base_dir = Path(base_dir)
    tokenizer = OmniTokenizer(tokenizer_file)
    tokenizer_sha = file_sha256(tokenizer_file)
    for split in SPLITS:
        if (base_dir / split / source).exists():
            raise PreprocessError(f"{base_dir / split / source}: already exists; use another --source or --base_dir")
    kept_tokenizer = base_dir / "tokenizer.model"
    if kept_tokenizer.exists() and file_sha256(kept_tokenizer) != tokenizer_sha:
        raise PreprocessError(f"{kept_tokenizer}: a different tokenizer already encoded data in this --base_dir")
    base_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    meta = {
        "source": source,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer_sha,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-encode-{source}-", dir=base_dir))
    try:
        writers = {split: _SplitWriter(tmp / split, dtype) for split in SPLITS}

        def flush(batch):
            for modality in {m for m, _, _ in batch}:
                chosen = [(rid, seq) for m, rid, seq in batch if m == modality]
                encoded = tokenizer.encode(modality, [seq for _, seq in chosen], num_threads=num_threads)
                for (record_id, _), ids in zip(chosen, encoded):
                    writers["val" if is_val_record(record_id, val_fraction) else "train"].add(modality, ids)

        batch = []
        for record in tqdm(iter_shard_records(shard_paths), desc=f"encode {source}", unit="rec", mininterval=5):
            batch.append(record)
            if len(batch) >= batch_records:
                flush(batch)
                batch = []
        flush(batch)
        for split, writer in writers.items():
            writer.close(meta)
            if writer.n_records == 0:
                raise PreprocessError(f"the {split} split of '{source}' is empty; change --val_fraction or add records")
        for split in SPLITS:
            (base_dir / split).mkdir(exist_ok=True)
            os.replace(tmp / split, base_dir / split / source)
        if not kept_tokenizer.exists():
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
            os.replace(tmp / "tokenizer.model", kept_tokenizer)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {split: json.loads((base_dir / split / source / "meta.json").read_text()) for split in SPLITS}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="record shards (*.tsv.gz)")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece model from train_tokenizer")
    parser.add_argument("--base_dir", required=True, help="output root; the trainer's --base_dir")
    parser.add_argument("--source", required=True, help="name of this data source, e.g. genbank or uniprot")
    parser.add_argument("--val_fraction", type=float, default=0.01)
    parser.add_argument("--num_threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    metas = encode_shards(
        args.shards, args.tokenizer, args.base_dir, args.source, args.val_fraction, num_threads=args.num_threads
    )
    for split, meta in metas.items():
        print(f"{split}/{args.source}: {meta['n_records']} records, {meta['n_tokens']:,} tokens ({meta['dtype']})")


if __name__ == "__main__":
    sys.exit(run_cli(main))
