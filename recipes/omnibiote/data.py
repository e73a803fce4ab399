"""Training batches from the encoded token arrays: packed windows of records, masked for MLM.

A row is a random ctx_len window of one source's flat token array (records back to back). Records inside a window
only attend to themselves (block-diagonal attention from per-token record ids). A window that starts inside a
record gets that record's modality token as its first token, so every stretch of sequence is labelled DNA, RNA or
protein. 15% of ordinary tokens are replaced by <mask> and predicted (the original always uses the mask token).
Sampling draws only from the batcher's own torch.Generator, which the checkpoint saves, so a resume is exact.
check_fingerprint compares each split's meta.json with the tokenizer given to training before anything is trained.

Data position: the run counts the sequences it has drawn, summed over ranks (`samples_seen`, the same on every rank).
The k-th mini-batch of the whole run is drawn from a generator seeded by (seed, k) alone (`draw_batch`), and each
optimizer step takes a fixed number of these mini-batches (the step plan is computed for one process), spread over
the ranks (`micro_batches`). So the data of a step does not depend on how many processes share it: a run saved by 2
processes continues with 1 (or the other way round) on exactly the mini-batches an uninterrupted run would have used.
"""

import hashlib
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from errors import DataError

IGNORE_INDEX = -100
FORMAT_VERSION = 2  # the newest encoded-data format this reader knows (preprocessing.encode_shards writes it)
log = logging.getLogger("omnibiote")


class TokenSource:
    """Memory-mapped tokens.bin / offsets.bin / meta.json of one source in one split."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            self.tokens = np.memmap(self.folder / "tokens.bin", dtype=self.meta["dtype"], mode="r")
            self.offsets = np.memmap(self.folder / "offsets.bin", dtype=np.int64, mode="r")
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{self.folder}: unreadable encoded data ({exc})") from None
        if len(self.tokens) != self.meta["n_tokens"] or len(self.offsets) != self.meta["n_records"] + 1:
            raise DataError(f"{self.folder}: tokens.bin/offsets.bin sizes disagree with meta.json (truncated copy?)")
        self.n_tokens = len(self.tokens)

    def window(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and record numbers (0 = first record in the window) of tokens[start:start+length]."""
        ids = np.array(self.tokens[start : start + length], dtype=np.int64)
        records = np.searchsorted(self.offsets, np.arange(start, start + len(ids)), side="right") - 1
        first_record_start = int(self.offsets[records[0]])
        if start != first_record_start:  # entered mid-record: keep its modality label
            ids[0] = self.tokens[first_record_start]
        return ids, records - records[0]


def load_split(base_dir: str | Path, split: str) -> dict[str, TokenSource]:
    """All sources of `<base_dir>/<split>/`; raises DataError when the split is missing or mixes tokenizers."""
    folder = Path(base_dir) / split
    source_dirs = sorted(p.parent for p in folder.glob("*/meta.json"))
    if not source_dirs:
        raise DataError(
            f"{folder}: no encoded data (expected <source>/tokens.bin, offsets.bin, meta.json);"
            " run preprocessing.encode_shards with --base_dir pointing here"
        )
    sources = {path.name: TokenSource(path) for path in source_dirs}
    if len({s.meta["tokenizer_sha256"] for s in sources.values()}) > 1:
        raise DataError(f"{folder}: sources were encoded with different tokenizers")
    return sources


def check_fingerprint(sources: Iterable["TokenSource"], tokenizer) -> None:
    """Refuse encoded data made with another tokenizer than the one training uses (one DataError line naming the
    source's meta.json and the tokenizer file): tokenizer sha256, vocab size, special ids, a newer format, a dtype
    that cannot hold every id. Data written before these were recorded only gets a warning.
    """
    for source in sources:
        meta, path = source.meta, source.folder / "meta.json"
        version = meta.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise DataError(
                f"{path}: format_version {version} is newer than this reader ({FORMAT_VERSION}) and"
                f" {tokenizer.model_file}; update the recipe"
            )
        recorded = meta.get("tokenizer_sha256")
        if recorded is None:
            log.warning("%s: records no tokenizer; cannot check it against %s", path, tokenizer.model_file)
        elif recorded != tokenizer.sha256:
            raise DataError(
                f"{path}: encoded with tokenizer sha256 {recorded[:12]}…, but {tokenizer.model_file} has"
                f" {tokenizer.sha256[:12]}…; train with the tokenizer.model it was encoded with or re-encode"
            )
        if meta.get("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
            raise DataError(
                f"{path}: encoded with {meta['vocab_size']} pieces, {tokenizer.model_file} has {tokenizer.vocab_size}"
            )
        if np.iinfo(np.dtype(meta["dtype"])).max < tokenizer.vocab_size - 1:
            raise DataError(f"{path}: dtype {meta['dtype']} cannot hold the ids of {tokenizer.model_file}")
        if version < 2:
            log.warning("%s: written before special ids were recorded (format 1); not checked", path)
        elif meta.get("special_ids") != tokenizer.special_id_map():
            raise DataError(
                f"{path}: special ids {meta.get('special_ids')} differ from {tokenizer.model_file}'s"
                f" {tokenizer.special_id_map()}; re-encode with preprocessing.encode_shards"
            )


def parse_source_weights(text: str | None, sources: dict[str, TokenSource]) -> dict[str, float]:
    """'genbank=0.8,uniprot=0.2' -> weights; None -> proportional to each source's token count."""
    if not text:
        return {name: float(source.n_tokens) for name, source in sources.items()}
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in sources:
            raise DataError(f"--source_weights names '{name}', but the sources are {sorted(sources)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise DataError(f"--source_weights: '{item}' is not name=number") from None
    if sum(weights.values()) <= 0:
        raise DataError("--source_weights must have a positive total")
    return weights


class PackedMLMBatcher:
    """Draws (input_ids, doc_ids, labels) batches of shape (mini_batch_size, ctx_len)."""

    def __init__(self, sources, weights, ctx_len, mini_batch_size, tokenizer, generator, mask_prob=0.15):
        self.sources = [sources[name] for name in weights]
        self.weights = torch.tensor(list(weights.values()), dtype=torch.float64)
        self.ctx_len, self.mini_batch_size, self.mask_prob = ctx_len, mini_batch_size, mask_prob
        self.pad_id, self.mask_id = tokenizer.pad_id, tokenizer.mask_id
        self.special_ids = torch.tensor(tokenizer.special_ids)
        self.generator = generator

    def _row(self) -> tuple[torch.Tensor, torch.Tensor]:
        choice = int(torch.multinomial(self.weights, 1, generator=self.generator))
        source = self.sources[choice]
        last_start = max(0, source.n_tokens - self.ctx_len)
        start = int(torch.randint(0, last_start + 1, (1,), generator=self.generator))
        ids, records = source.window(start, self.ctx_len)
        row_ids = torch.full((self.ctx_len,), self.pad_id, dtype=torch.long)
        row_docs = torch.full((self.ctx_len,), -1, dtype=torch.long)
        row_ids[: len(ids)], row_docs[: len(ids)] = torch.from_numpy(ids), torch.from_numpy(records)
        return row_ids, row_docs

    def next_batch(self) -> dict[str, torch.Tensor]:
        """One masked batch: input_ids with <mask>, doc_ids (-1 = padding), labels (-100 = not predicted)."""
        rows = [self._row() for _ in range(self.mini_batch_size)]
        input_ids = torch.stack([ids for ids, _ in rows])
        doc_ids = torch.stack([docs for _, docs in rows])
        maskable = ~torch.isin(input_ids, self.special_ids) & (doc_ids >= 0)
        chosen = (torch.rand(input_ids.shape, generator=self.generator) < self.mask_prob) & maskable
        if not chosen.any() and maskable.any():  # an empty loss would be NaN
            candidates = maskable.flatten().nonzero().flatten()
            pick = candidates[torch.randint(0, len(candidates), (1,), generator=self.generator)]
            chosen.view(-1)[pick] = True
        labels = torch.where(chosen, input_ids, IGNORE_INDEX)
        input_ids = input_ids.masked_fill(chosen, self.mask_id)
        return {"input_ids": input_ids, "doc_ids": doc_ids, "labels": labels}

    def fixed_batches(self, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """n batches drawn once, e.g. the validation set evaluated at every --test_freq."""
        return [self.next_batch() for _ in range(n_batches)]


def stream_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit generator seed for mini-batch `index` of `stream` ("train"/"val"); independent of the world size."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_batch(batcher: PackedMLMBatcher, seed: int, stream: str, index: int) -> dict[str, torch.Tensor]:
    """Mini-batch `index` of a stream: (mini_batch_size, ctx_len) input_ids / doc_ids / labels, always the same."""
    batcher.generator = torch.Generator().manual_seed(stream_seed(seed, stream, index))
    return batcher.next_batch()


def micro_batches(units: int, world_size: int, rank: int, first_unit: int) -> list[tuple[int, float]]:
    """(global mini-batch index, loss weight) of this rank's micro-batches in a step of `units` mini-batches.

    Unit k of the step goes to rank k % world_size. DDP averages gradients over ranks, so a weight of
    world_size / units makes the step's gradient the mean over its units whatever the world size. A rank left
    without a unit (during the batch ramp, when units is not a multiple of world_size) runs a weight-0 copy of the
    step's first unit, because every rank must join each gradient all-reduce.
    """
    per_rank = math.ceil(units / world_size)
    plan = []
    for micro in range(per_rank):
        k = micro * world_size + rank
        plan.append((first_unit + k, world_size / units) if k < units else (first_unit, 0.0))
    return plan
