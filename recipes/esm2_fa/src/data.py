"""Streaming loader over `shard-XXXXX/` dirs written by data_processing.py, with MLM masking.

Each (rank, DataLoader worker) pair is one *slot*; slot s of S owns shards s, s+S, s+2S, ... so no shard is read
twice per cycle. A slot visits its shards in a new random order every cycle, forever; training stops at max_steps.
A shard is memory-mapped (never loaded into RAM) and each batch is one contiguous slice of rows.
Masks are drawn from a generator seeded by (seed, rank, batch number), so a resumed run masks exactly as an
uninterrupted one would.
check_data_dirs() opens every shard and compares the `packing.json` the shards were written with against the model
that will read them (vocabulary, special ids, token budget, positions), refusing a mismatch before training starts:
the one place the token budget of the data meets model.max_batch_size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from datasets import load_from_disk
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import data_processing
from data_processing import FORMAT_VERSION, IGNORE_INDEX, PACKING_FILE, read_packing, vocab_sha256
from model import CLS_ID, EOS_ID, ESM_VOCAB, MASK_ID, PAD_ID, STANDARD_AA_IDS

log = logging.getLogger("esm2_fa")  # the logger train.py configures (rank-0 output)

SPECIAL_IDS = (CLS_ID, PAD_ID, EOS_ID)
TENSOR_COLUMNS = ["input_ids", "attention_mask", "labels"]
SHARD_COLUMNS = [*TENSOR_COLUMNS, "batch_id"]  # what the loader reads


class DataDirError(ValueError):
    """A train/val dir is missing, holds no or broken shards, or has too few shards for the ranks and workers."""


def list_shards(data_dir: str | Path, what: str = "data") -> list[Path]:
    """Sorted `shard-XXXXX` dirs under data_dir; raises DataDirError when there are none."""
    data_dir = Path(data_dir) if data_dir else None
    if data_dir is None or not data_dir.is_dir():
        raise DataDirError(f"{what} dir {data_dir} does not exist (run data_processing.py first)")
    shards = sorted(p for p in data_dir.glob("shard-*") if p.is_dir())
    if not shards:
        raise DataDirError(f"{what} dir {data_dir} holds no shard-XXXXX/ datasets")
    return shards


def check_shards(data_dir: str | Path, what: str = "data") -> list[Path]:
    """list_shards, after opening every shard: a broken one fails here, not at its first batch hours into a run."""
    shards = list_shards(data_dir, what)
    for path in shards:
        try:
            columns = load_from_disk(str(path)).column_names
        except Exception as err:  # datasets raises FileNotFoundError, JSON, Arrow and other errors for a bad dir
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise DataDirError(
                f"{what} shard {path} is not a dataset written by data_processing.py ({reason})"
            ) from err
        missing = [c for c in SHARD_COLUMNS if c not in columns]
        if missing:
            raise DataDirError(f"{what} shard {path} lacks columns {missing}; was it written by data_processing.py?")
    return shards


def model_vocabulary(model_cfg) -> tuple[list[str], str]:
    """(tokens in id order, where they come from): a local model dir's vocab.txt, else the ESM-2 vocabulary."""
    vocab_file = Path(str(model_cfg.model_name)) / "vocab.txt"
    if vocab_file.is_file():
        return vocab_file.read_text(encoding="utf-8").splitlines(), str(vocab_file)
    return list(ESM_VOCAB), f"the ESM-2 vocabulary of {model_cfg.model_name} (src/model.py)"


def check_data_dirs(cfg) -> None:
    """Every train/val check that needs the files, before anything is written: the val shards open (the train
    shards are opened by ShardStream), and both dirs' packing.json fit the model section (check_data_fingerprints).
    Raises DataDirError (one line)."""
    check_shards(cfg.data.val_dir, "val")
    check_data_fingerprints({"train": cfg.data.train_dir, "val": cfg.data.val_dir}, cfg.model)


def check_data_fingerprints(data_dirs: dict[str, str | Path], model_cfg, vocab: list[str] | None = None) -> None:
    """Check every {what: shard dir}'s packing.json against the model section (and vocabulary) it will train.

    Refused with one DataDirError line naming packing.json and the model side: another vocabulary (sha256 of
    vocab.txt) or special ids, a newer format, a token budget above model.max_batch_size, rows longer than
    model.max_position_embeddings. Shards without packing.json, or written before the vocabulary was recorded
    (format 1), only get a warning: there is nothing to compare.
    """
    vocab, vocab_source = (vocab, "the given vocabulary") if vocab is not None else model_vocabulary(model_cfg)
    for what, data_dir in data_dirs.items():
        check_fingerprint(Path(data_dir), what, model_cfg, vocab, vocab_source)


def check_fingerprint(data_dir: Path, what: str, model_cfg, vocab: list[str], vocab_source: str) -> None:
    """One shard dir's packing.json against the model section; see check_data_fingerprints."""
    path = data_dir / PACKING_FILE
    try:
        packing = read_packing(data_dir)
    except ValueError as err:
        raise DataDirError(str(err)) from err
    if packing is None:
        log.warning(
            "%s dir %s has no %s (older shards): cannot check them against the model", what, data_dir, PACKING_FILE
        )
        return
    version = packing.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DataDirError(f"{path}: format_version {version} is newer than this loader ({FORMAT_VERSION}); update it")
    if version < 2:
        log.warning("%s: written before vocabularies were recorded; cannot check it against %s", path, vocab_source)
    elif packing.get("vocab_sha256") != vocab_sha256(vocab):
        raise DataDirError(
            f"{path}: {what} shards were tokenized with vocabulary sha256 {str(packing.get('vocab_sha256'))[:12]}…, "
            f"but {vocab_source} has {vocab_sha256(vocab)[:12]}…; re-run data_processing.py for this model"
        )
    elif packing.get("special_ids") != data_processing.SPECIAL_IDS:
        raise DataDirError(
            f"{path}: {what} shards use special ids {packing.get('special_ids')}, but the model expects {data_processing.SPECIAL_IDS}"
        )
    budget, longest = packing["token_budget"], packing["max_aa_length"] + 2
    if budget > model_cfg.max_batch_size:
        raise DataDirError(
            f"{path}: {what} shards were packed with a token budget of {budget} but the config's model.max_batch_size "
            f"is {model_cfg.max_batch_size}; re-run data_processing.py with --token_budget {model_cfg.max_batch_size} "
            "(or the same --config) or raise model.max_batch_size"
        )
    if longest > model_cfg.max_position_embeddings:
        raise DataDirError(
            f"{path}: {what} shards hold rows of up to {longest} tokens but the config's model.max_position_embeddings "
            f"is {model_cfg.max_position_embeddings}; re-run data_processing.py with a smaller --max_aa_length"
        )


def batch_bounds(shard) -> list[tuple[int, int]]:
    """(start, end) row ranges of the batches in a shard; rows of one batch are contiguous."""
    batch_ids = np.asarray(shard.with_format("numpy")["batch_id"])
    starts = np.flatnonzero(np.diff(batch_ids, prepend=batch_ids[0] - 1))
    ends = np.append(starts[1:], len(batch_ids))
    return list(zip(starts.tolist(), ends.tolist()))


def read_batch(shard, start: int, end: int) -> dict[str, torch.Tensor]:
    """One padded batch as int64 tensors (input_ids, attention_mask, labels)."""
    rows = shard.with_format("torch", columns=TENSOR_COLUMNS)[start:end]
    return {name: rows[name].long() for name in TENSOR_COLUMNS}


def mask_tokens(batch: dict[str, torch.Tensor], mlm_probability: float, generator: torch.Generator) -> dict:
    """BERT-style masking: pick mlm_probability of the residues; 80% -> <mask>, 10% -> random residue, 10% kept.

    Written here (not DataCollatorForLanguageModeling) to draw from an explicit generator: resume-exact masks.
    """
    input_ids = batch["input_ids"].clone()
    maskable = ~torch.isin(input_ids, torch.tensor(SPECIAL_IDS))
    chosen = (torch.rand(input_ids.shape, generator=generator) < mlm_probability) & maskable
    labels = torch.where(chosen, batch["input_ids"], torch.full_like(input_ids, IGNORE_INDEX))
    draw = torch.rand(input_ids.shape, generator=generator)
    to_mask = chosen & (draw < 0.8)
    to_random = chosen & (draw >= 0.8) & (draw < 0.9)
    random_ids = torch.tensor(STANDARD_AA_IDS)[
        torch.randint(len(STANDARD_AA_IDS), input_ids.shape, generator=generator)
    ]
    input_ids[to_mask] = MASK_ID
    input_ids[to_random] = random_ids[to_random]
    return {"input_ids": input_ids, "attention_mask": batch["attention_mask"], "labels": labels}


def _generator(*keys: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


class ShardStream(IterableDataset):
    """Infinite stream of masked batches for one rank; its DataLoader workers split the rank's shards."""

    def __init__(
        self,
        data_dir: str | Path,
        rank: int,
        world_size: int,
        num_workers: int,
        mlm_probability: float,
        seed: int = 0,
        start_batch: int = 0,
    ):
        self.shards = check_shards(data_dir, "train")
        self.num_slots = world_size * max(1, num_workers)
        if len(self.shards) < self.num_slots:
            raise DataDirError(
                f"train dir {data_dir} has {len(self.shards)} shards but world_size {world_size} x num_workers "
                f"{max(1, num_workers)} = {self.num_slots} readers need at least one each; re-run data_processing.py "
                "with a smaller --shard_size or use fewer workers"
            )
        self.rank, self.num_workers = rank, max(1, num_workers)
        self.mlm_probability, self.seed = mlm_probability, seed
        self.start_batch = start_batch  # batches this rank already consumed (resume)

    def slot_shards(self, slot: int) -> list[Path]:
        """The shards that reader slot `slot` owns."""
        return self.shards[slot :: self.num_slots]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        # The DataLoader takes batches round-robin from its workers, starting with worker 0. So that worker 0's
        # first batch is rank-local batch `start_batch`, worker w plays the role of stream lane
        # (w + start_batch) % W, and lane l produces rank-local batches l, l+W, l+2W, ...
        worker = info.id if info is not None else 0
        lane = (worker + self.start_batch) % self.num_workers
        slot = self.rank * self.num_workers + lane
        rank_batch = lane
        skip = len(range(lane, self.start_batch, self.num_workers))
        open_path, shard = None, None
        for shard_path, start, end in self._slot_batches(slot):
            if skip:  # resume: skip without reading rows
                skip -= 1
            else:
                if shard_path != open_path:
                    open_path, shard = shard_path, load_from_disk(str(shard_path))
                batch = read_batch(shard, start, end)
                yield mask_tokens(batch, self.mlm_probability, _generator(self.seed, self.rank, rank_batch))
            rank_batch += self.num_workers

    def _slot_batches(self, slot: int) -> Iterator[tuple[Path, int, int]]:
        owned = self.slot_shards(slot)
        bounds = {path: batch_bounds(load_from_disk(str(path))) for path in owned}
        for cycle in range(10**12):  # "forever": max_steps ends training
            order = torch.randperm(len(owned), generator=_generator(self.seed, slot, cycle)).tolist()
            for i in order:
                for start, end in bounds[owned[i]]:
                    yield owned[i], start, end


def eval_batches(data_dir: str | Path, rank: int, world_size: int, mlm_probability: float, seed: int = 0):
    """One pass over every validation batch; batch i goes to rank i % world_size, with masks fixed per batch."""
    batch_no = 0
    for shard_path in list_shards(data_dir, "val"):
        shard = load_from_disk(str(shard_path))
        for start, end in batch_bounds(shard):
            if batch_no % world_size == rank:
                yield mask_tokens(read_batch(shard, start, end), mlm_probability, _generator(seed, 2**31, batch_no))
            batch_no += 1


def make_train_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    """DataLoader over a ShardStream; batches are pre-built, so batch_size=None."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
