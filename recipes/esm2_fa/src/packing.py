"""One window of proteins -> chunked, tokenized, token-budget batches as padded flat arrays (one worker's job).

A window is the unit of parallel preprocessing: it depends only on its own records, the settings and its index
(the batch-order shuffle is seeded by (seed, window index)), so any number of processes produce the same windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fasta_reader import VALID_RESIDUES, parse_block
from model import CLS_ID, EOS_ID, ESM_VOCAB, PAD_ID

_RESIDUE_TO_ID = np.full(256, -1, dtype=np.int8)
for _letter in VALID_RESIDUES:
    _RESIDUE_TO_ID[ord(_letter)] = ESM_VOCAB.index(_letter)
_TOKEN_TABLE = bytearray(_RESIDUE_TO_ID.astype(np.uint8).tobytes())  # byte -> token id, for bytes.translate
for _char, _id in (("<", CLS_ID), (">", EOS_ID), ("#", PAD_ID)):
    _TOKEN_TABLE[ord(_char)] = _id
_TOKEN_TABLE = bytes(_TOKEN_TABLE)


@dataclass
class Chunk:
    """One refined sequence: a whole protein or one piece of a long one."""

    id: str  # FASTA header incl. '>' and, for pieces, a '/start-end' residue range (1-based, inclusive)
    residues: str
    bos: bool  # only the first piece of a protein starts with <cls>
    eos: bool  # only the last piece ends with <eos>


@dataclass
class Window:
    """A window's rows in written order: batches one after another (shuffled), rows padded to their batch's width."""

    input_ids: np.ndarray  # int8, (sum of widths,): padded rows back to back
    widths: np.ndarray  # int64, (rows,): padded width of each row = longest row of its batch
    lengths: np.ndarray  # int64, (rows,): real tokens of each row
    batch_rows: np.ndarray  # int64, (batches,): rows per batch, in written order
    ids: list[str]  # (rows,) sequence ids
    refined: bytes  # this window's part of <input>_refined.fasta (UTF-8), in input order
    n_records: int  # input proteins in the window
    row_offsets: np.ndarray = field(init=False)  # (batches + 1,) first row of each batch
    token_offsets: np.ndarray = field(init=False)  # (rows + 1,) first token of each row

    def __post_init__(self):
        self.row_offsets = np.concatenate([[0], np.cumsum(self.batch_rows)])
        self.token_offsets = np.concatenate([[0], np.cumsum(self.widths)])


def chunk_protein(header: str, residues: str, max_aa_length: int) -> list[Chunk]:
    """Split a protein longer than max_aa_length into balanced pieces (lengths differ by at most one)."""
    n_pieces = math.ceil(len(residues) / max_aa_length)
    if n_pieces == 1:
        return [Chunk(header, residues, bos=True, eos=True)]
    name, _, description = header.partition(" ")
    base, extra = divmod(len(residues), n_pieces)
    chunks, start = [], 0
    for i in range(n_pieces):
        end = start + base + (1 if i < extra else 0)
        piece_id = f"{name}/{start + 1}-{end}" + (f" {description}" if description else "")
        chunks.append(Chunk(piece_id, residues[start:end], bos=i == 0, eos=i == n_pieces - 1))
        start = end
    return chunks


def tokenize(chunk: Chunk) -> np.ndarray:
    """Token ids (int8) of one chunk: `<cls>`? residues `<eos>`? by table look-up."""
    ids = _RESIDUE_TO_ID[np.frombuffer(chunk.residues.encode("ascii"), dtype=np.uint8)]
    parts = ([np.array([CLS_ID], np.int8)] if chunk.bos else []) + [ids]
    parts += [np.array([EOS_ID], np.int8)] if chunk.eos else []
    return np.concatenate(parts)


def pack_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Greedy packing of length-sorted sequences so that len(batch) * longest <= token_budget; returns indices."""
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    batches, current = [], []
    for idx in order:
        if current and (len(current) + 1) * lengths[idx] > token_budget:
            batches.append(current)
            current = []
        current.append(idx)
    if current:
        batches.append(current)
    return batches


def build_window(
    path: str | Path, index: int, first_record: int, block: bytes, max_aa_length: int, token_budget: int, seed: int
) -> Window:
    """Parse, chunk, tokenize and pack window `index` (a block of whole FASTA records); FastaError on bad input."""
    records = parse_block(path, first_record, block)
    chunks = [c for header, residues in records for c in chunk_protein(header, residues, max_aa_length)]
    # A chunk's tokens as one character each ('<' = <cls>, '>' = <eos>, '#' = <pad>): padding is str.ljust and
    # tokenizing is one bytes.translate over the whole window, with no per-token index arrays in memory.
    texts = [("<" if c.bos else "") + c.residues + (">" if c.eos else "") for c in chunks]
    n_tok = [len(text) for text in texts]
    batches = pack_batches(n_tok, token_budget)
    # Length-sorted packing would feed short batches first and long ones last; shuffle the batch order instead.
    batches = [batches[i] for i in np.random.default_rng([seed, index]).permutation(len(batches))]
    widths = [max(n_tok[i] for i in batch) for batch in batches]
    padded = "".join(texts[i].ljust(width, "#") for batch, width in zip(batches, widths) for i in batch)
    rows = [i for batch in batches for i in batch]
    batch_rows = np.array([len(batch) for batch in batches], np.int64)
    return Window(
        input_ids=np.frombuffer(padded.encode("ascii").translate(_TOKEN_TABLE), np.int8),
        widths=np.repeat(np.array(widths, np.int64), batch_rows),
        lengths=np.array([n_tok[i] for i in rows], np.int64),
        batch_rows=batch_rows,
        ids=[chunks[i].id for i in rows],
        refined="".join(f"{c.id}\n{c.residues}\n" for c in chunks).encode("utf-8"),
        n_records=len(records),
    )
