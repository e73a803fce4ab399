"""CPU benchmark of data.batching: how much of the compute is spent on cells, and real tokens/s, against `random`.

    python bench_batching.py                      # ~5 min on 2 quiet cores (much longer on a loaded machine)
    python bench_batching.py --micro-batch-size 4 --repeats 7 --no-real
    python bench_batching.py --micro-batch-size 10 --repeats 3 --no-real   # the issue's figure: ~30 min under load

Two corpora, the 10m model (6 x 256, 2,048 positions, fp32, its dropout) and train.py's step (forward, backward on the
masked tokens, AdamW):
  synthetic  CELLS cells with the Genecorpus-like length model (lognormal, median 1,000, 7% at the 2,048 cap): the
             spread the Geneformer paper reports, which neither bundled sample has;
  real       the 500 Genecorpus-30M cells of ../shared/data/genecorpus_500 (99.4% at the cap: nothing to gain, and
             nothing may be lost); skipped with a message when absent.
Columns: useful-token fraction (real tokens / positions computed) over one whole epoch, at the timed micro-batch size
and at 10 (the configs' default); real tokens/s: median over `repeats` steps per mode after one warm-up step each
(the first two rows of the epoch's first batch: it only pays first-call costs), modes in turns, the timed batches at
evenly spaced quantiles of the epoch's batch costs (spread_batches); ratio against random. Two more ratios:
"pooled", all timed tokens over all timed seconds (what an epoch of such batches gives; a median of per-batch rates
favours length_grouped, whose short-cell batches run faster per token), and the same pooled over this process' CPU
time (a cross-check on a shared machine whose share of the cores drifts).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

RECIPE_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(RECIPE_DIR))

from batching import BATCHING_MODES  # noqa: E402
from config import load_config  # noqa: E402
from data import CellDataset, MaskingCollator, batch_token_counts, iterate_batches  # noqa: E402
from dictionaries import read_vocab  # noqa: E402
from model import BertForMaskedLM, geneformer_config  # noqa: E402

MAX_LENGTH = 2048
CELLS = 5000
V1_VOCAB = ["<pad>", "<mask>"] + [f"G{i}" for i in range(25_424)]  # V1's 25,426 tokens


def genecorpus_like_lengths(count: int, seed: int = 0) -> np.ndarray:
    """Lognormal cell lengths, median 1,000, 7% at the 2,048 cap (93% of Genecorpus-30M cells fit 2,048 genes)."""
    sigma = np.log(2.048) / 1.476  # P(length > 2,048) = 0.07 at median 1,000
    lengths = np.random.default_rng(seed).lognormal(np.log(1000), sigma, count)
    return np.clip(np.round(lengths), 16, MAX_LENGTH).astype(np.int64)


class SyntheticCells:
    """A CellDataset stand-in: cells of the given lengths, random genes seeded by the cell index."""

    def __init__(self, lengths: np.ndarray, vocab_size: int):
        self.lengths_, self.vocab_size = lengths, vocab_size
        self.path, self.max_length = Path("synthetic"), int(lengths.max())

    def __len__(self) -> int:
        return len(self.lengths_)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.random.default_rng(index).integers(2, self.vocab_size, self.lengths_[index])

    def lengths(self) -> np.ndarray:
        return self.lengths_


class Counts:
    """A collator that returns only (real tokens, positions) of the batch MaskingCollator would build, cheaply."""

    def __init__(self, collator: MaskingCollator):
        self.width = collator._width

    def __call__(self, cells) -> tuple[int, int]:
        lengths = [len(cell) for cell in cells]
        return sum(lengths), len(lengths) * self.width(max(lengths))

    def pack(self, rows) -> tuple[int, int]:
        lengths = [sum(len(cell) for cell in row) for row in rows]
        return sum(lengths), len(lengths) * self.width(max(lengths))


def one_epoch(dataset, collator, mode: str, micro_batch_size: int):
    """The batches of epoch 0 (a step that runs into epoch 1 is the last), from train.py's own stream."""
    for position, batch in iterate_batches(dataset, collator, micro_batch_size, 0, 0, 1, batching=mode):
        yield batch
        if position["epoch"] > 0:
            return


def epoch_counts(dataset, collator, mode: str, micro_batch_size: int) -> list[tuple[int, int]]:
    """(real tokens, positions computed) of each batch of epoch 0."""
    return list(one_epoch(dataset, Counts(collator), mode, micro_batch_size))


def epoch_fraction(counts: list[tuple[int, int]]) -> float:
    """Useful-token fraction over the epoch."""
    return sum(c[0] for c in counts) / sum(c[1] for c in counts)


def spread_batches(dataset, collator, mode: str, micro_batch_size: int, counts, count: int) -> list[dict]:
    """The first batch of epoch 0 (the warm-up), then `count` batches at evenly spaced quantiles of cost (positions
    computed, then real tokens), cheapest first: a sample of the epoch's mix of long and short batches. Evenly spaced
    steps do not give one: they alias with length_grouped's mega-batches (50 batches sorted longest first), and at
    micro-batch 10 timed only the longest and the shortest batches of a mega-batch."""
    by_cost = sorted(range(len(counts)), key=lambda i: (counts[i][1], counts[i][0], i))
    wanted = [by_cost[int((j + 0.5) * len(counts) / count)] for j in range(count)]
    found = {}
    for index, batch in enumerate(one_epoch(dataset, collator, mode, micro_batch_size)):
        if index == 0 or index in wanted:
            found[index] = batch
    return [found[0]] + [found[index] for index in wanted]


def interleaved_rates(model: BertForMaskedLM, batches: dict[str, list[dict]]) -> dict[str, tuple[float, float, float]]:
    """Per mode, real tokens/s of a train step: (median over steps, pooled over wall time, pooled over CPU time);
    modes take turns, the first batch of each is a warm-up, cut to two rows (a full 10 x 2,048 step takes minutes on
    a loaded machine). Not logging_utils.interleaved_medians: every call here has its own batch and token count."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps_done: dict[str, list[tuple[int, float, float]]] = {mode: [] for mode in batches}
    for index in range(len(next(iter(batches.values())))):
        for mode, steps in batches.items():
            batch = steps[index] if index else {key: value[:2] for key, value in steps[0].items()}
            start, cpu_start = time.perf_counter(), time.process_time()
            model(**batch, masked_logits_only=True).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if index:
                steps_done[mode].append((batch_token_counts(batch)[0], wall, cpu))
    rates = {}
    for mode, done in steps_done.items():
        tokens, wall, cpu = (sum(step[i] for step in done) for i in range(3))
        rates[mode] = (statistics.median(step[0] / step[1] for step in done), tokens / wall, tokens / cpu)
    return rates


def corpus_rows(name: str, dataset, vocab: list[str], micro_batch_size: int, repeats: int) -> list[dict]:
    """One row per batching mode for this corpus."""
    collator = MaskingCollator(vocab, generator=torch.Generator().manual_seed(0), max_length=MAX_LENGTH)
    fractions, timed = {}, {}
    for mode in BATCHING_MODES:
        counts = epoch_counts(dataset, collator, mode, micro_batch_size)
        fractions[mode] = (epoch_fraction(counts), epoch_fraction(epoch_counts(dataset, collator, mode, 10)))
        timed[mode] = spread_batches(dataset, collator, mode, micro_batch_size, counts, repeats)
    model_cfg = load_config("10m").model
    # attribute access only: the same for the config's DictConfig and a dataclass
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act")
    keys += ("hidden_dropout_prob", "attention_probs_dropout_prob")
    torch.manual_seed(0)
    config = geneformer_config(
        len(vocab), max_position_embeddings=MAX_LENGTH, **{key: getattr(model_cfg, key) for key in keys}
    )
    model = BertForMaskedLM(config).train()
    rates = interleaved_rates(model, timed)
    return [
        {
            "corpus": name,
            "batching": mode,
            "useful_fraction": fractions[mode][0],
            "useful_fraction_mbs10": fractions[mode][1],
            "tokens_per_s": rates[mode][0],
            "ratio": rates[mode][0] / rates["random"][0],
            "pooled_ratio": rates[mode][1] / rates["random"][1],
            "pooled_cpu_ratio": rates[mode][2] / rates["random"][2],
        }
        for mode in BATCHING_MODES
    ]


def real_corpus() -> tuple[Path, Path] | None:
    shared = Path(os.environ.get("BIORECIPES_SHARED_DATA", RECIPE_DIR.parents[2] / "shared" / "data"))
    corpus = shared / "genecorpus_500"
    if (corpus / "genecorpus_500_samples.parquet").is_file() and (corpus / "vocab.txt").is_file():
        return corpus / "genecorpus_500_samples.parquet", corpus / "vocab.txt"
    return None


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        print(
            f"{row['corpus']:<15} {row['batching']:<15} {row['useful_fraction']:>7.3f} "
            f"{row['useful_fraction_mbs10']:>10.3f} {row['tokens_per_s']:>11.0f} {row['ratio']:>9.2f}x "
            f"{row['pooled_ratio']:>9.2f}x {row['pooled_cpu_ratio']:>9.2f}x",
            flush=True,
        )


def batching_rows(
    micro_batch_size: int = 2,
    repeats: int = 5,
    cells: int = CELLS,
    real: bool = True,
    show=lambda rows: None,
    synthetic: bool = True,
) -> list[dict]:
    """The table's rows: synthetic corpus, then (when present) the real Genecorpus cells; `show` gets each corpus'
    rows as soon as they are measured."""
    rows = []
    if synthetic:
        corpus = SyntheticCells(genecorpus_like_lengths(cells), len(V1_VOCAB))
        rows += corpus_rows("synthetic", corpus, V1_VOCAB, micro_batch_size, repeats)
        show(rows)
    found = real_corpus() if real else None
    if real and found is None:
        print("real Genecorpus cells not found (../shared/data/genecorpus_500 or $BIORECIPES_SHARED_DATA): skipped")
    if found is not None:
        vocab = read_vocab(found[1])
        dataset = CellDataset(found[0], len(vocab), MAX_LENGTH)
        real_rows = corpus_rows("genecorpus_500", dataset, vocab, micro_batch_size, repeats)
        show(real_rows)
        rows += real_rows
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch-size", type=int, default=2, help="cells (rows when packed) per timed step")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per mode, after one warm-up")
    parser.add_argument("--cells", type=int, default=CELLS, help="synthetic corpus size")
    parser.add_argument("--no-real", action="store_true", help="skip the real Genecorpus cells")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic corpus")
    # known args only: bench.py calls main() under its own command line (--no-scale, ...)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    print(
        f"data.batching, Geneformer 10m at {MAX_LENGTH} (fp32, train step), micro-batch {args.micro_batch_size}, "
        f"median of {args.repeats} interleaved steps, {torch.get_num_threads()} CPU threads",
        flush=True,
    )
    print(
        f"{'corpus':<15} {'batching':<15} {'useful':>7} {'useful@10':>10} {'real tok/s':>11} {'vs random':>10} "
        f"{'pooled':>10} {'pooled cpu':>10}"
    )
    rows = batching_rows(
        args.micro_batch_size, args.repeats, args.cells, not args.no_real, print_rows, not args.no_synthetic
    )
    synthetic = {row["batching"]: row for row in rows if row["corpus"] == "synthetic"}
    if not synthetic:
        return rows
    print(
        f"headline: synthetic real tokens/s length_grouped {synthetic['length_grouped']['ratio']:.2f}x, packed "
        f"{synthetic['packed']['ratio']:.2f}x random (useful fraction {synthetic['random']['useful_fraction']:.2f} -> "
        f"{synthetic['length_grouped']['useful_fraction']:.2f} / {synthetic['packed']['useful_fraction']:.2f})"
    )
    return rows


if __name__ == "__main__":
    main()
