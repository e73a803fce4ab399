"""CPU benchmark: this recipe's plain Geneformer against transformers' BertForMaskedLM of the same size and weights.

    python bench.py                 # ~1-3 minutes on 2 cores; uses real Genecorpus cells when ../shared/data has them
    python bench.py --no-scale      # without the data-at-scale section (bench_scale.py, ~10 more minutes)

Rows (median of REPEATS, interleaved A/B after a warm-up, same batches, same weights):
  train step     forward+backward as train.py runs it (loss on the masked tokens only) vs transformers (labels given)
  same work      forward+backward, both computing logits for every token (isolates the encoder implementation)
  inference      forward only, logits for every token
  tokenizer      preprocess.py rank-value encoding of the bundled real PBMC counts, cells/s
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

RECIPE_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(RECIPE_DIR))

from data import CellDataset, MaskingCollator  # noqa: E402
from dictionaries import read_gene_medians, read_vocab  # noqa: E402
from model import BertForMaskedLM, geneformer_config  # noqa: E402
from readers import open_source  # noqa: E402
from tokenize_cells import Encoder, GeneColumns, normalise  # noqa: E402

REPEATS = 5
SEQ_LEN, BATCH = 256, 8
SIZE = {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 512}  # 10m


def find_cells() -> tuple[Path, Path, str]:
    """Real Genecorpus cells (25,426-gene vocabulary) when available, else the bundled PBMC sample."""
    shared = Path(os.environ.get("BIORECIPES_SHARED_DATA", RECIPE_DIR.parents[2] / "shared" / "data"))
    corpus = shared / "genecorpus_500"
    if (corpus / "genecorpus_500_samples.parquet").is_file():
        return corpus / "genecorpus_500_samples.parquet", corpus / "vocab.txt", "Genecorpus-30M cells"
    return RECIPE_DIR / "sample_data" / "cells.parquet", RECIPE_DIR / "sample_data" / "vocab.txt", "bundled PBMC cells"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, ours, theirs, tokens: int) -> tuple[str, float, float]:
    """Median seconds of each callable, interleaved (order alternating), after one warm-up call each."""
    ours(), theirs()
    ours_times, theirs_times = [], []
    for repeat in range(REPEATS):
        pair = [(ours, ours_times), (theirs, theirs_times)]
        for fn, times in pair if repeat % 2 == 0 else reversed(pair):
            times.append(timed(fn))
    return name, tokens / statistics.median(ours_times), tokens / statistics.median(theirs_times)


def main() -> None:
    torch.manual_seed(0)
    cells_path, vocab_path, source = find_cells()
    vocab = read_vocab(vocab_path)
    config = geneformer_config(
        len(vocab),
        hidden_act="relu",
        max_position_embeddings=SEQ_LEN,
        hidden_dropout_prob=0.02,
        attention_probs_dropout_prob=0.02,
        **SIZE,
    )
    ours = BertForMaskedLM(config)
    theirs = transformers.BertForMaskedLM(config)  # transformers 4.53 uses SDPA attention for BERT by default
    theirs.load_state_dict(ours.state_dict())
    dataset = CellDataset(cells_path, len(vocab), SEQ_LEN)
    batch = MaskingCollator(vocab, pad_to_multiple_of=16)([dataset[i] for i in range(BATCH)])
    tokens = int(batch["attention_mask"].sum())
    hf_batch = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}

    def step(model, **kwargs):
        def run():
            model.train()
            model.zero_grad(set_to_none=True)
            model(**kwargs).loss.backward()

        return run

    def infer(model, **kwargs):
        def run():
            model.eval()
            with torch.no_grad():
                model(**kwargs)

        return run

    no_labels = {key: batch[key] for key in ("input_ids", "attention_mask")}
    rows = [
        compare("train step", step(ours, **batch, masked_logits_only=True), step(theirs, **hf_batch), tokens),
        compare("same work", step(ours, **batch), step(theirs, **hf_batch), tokens),
        compare("inference", infer(ours, **no_labels), infer(theirs, **no_labels), tokens),
    ]

    counts = open_source(RECIPE_DIR / "sample_data" / "pbmc500_counts.h5ad")
    block = counts.read_block(0, counts.n_rows)
    columns = GeneColumns.of(counts.gene_ids, keep_version=False)
    normalised = normalise(columns.apply(block.counts), block.totals, block.cell_ids, str(counts.path))
    medians = read_gene_medians(RECIPE_DIR / "sample_data" / "gene_medians.json")
    encoder = Encoder.of(columns.genes, ["<pad>", "<mask>", *sorted(medians)], medians, "v1", 2048, False)
    tokenize_seconds = statistics.median(timed(lambda: encoder.encode(normalised)) for _ in range(REPEATS))

    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(
        f"Geneformer 10m-size ({params:.1f}M parameters, vocab {len(vocab)}), {BATCH} x {SEQ_LEN} {source}, "
        f"{torch.get_num_threads()} CPU threads, median of {REPEATS}"
    )
    print(f"{'row':<12} {'recipe tok/s':>13} {'transformers tok/s':>19} {'ratio':>7}")
    for name, ours_rate, theirs_rate in rows:
        print(f"{name:<12} {ours_rate:>13.0f} {theirs_rate:>19.0f} {ours_rate / theirs_rate:>6.2f}x")
    print(f"{'tokenizer':<12} {len(block.cell_ids) / tokenize_seconds:>13.0f} cells/s (rank-value encoding, 500 PBMC)")
    print(
        f"headline: train step {rows[0][1] / rows[0][2]:.2f}x transformers BertForMaskedLM "
        f"(same work {rows[1][1] / rows[1][2]:.2f}x, inference {rows[2][1] / rows[2][2]:.2f}x)"
    )


if __name__ == "__main__":
    main()
    if "--no-scale" not in sys.argv[1:]:
        import bench_scale

        print()
        bench_scale.main([])
