"""Downstream check: k-NN accuracy of cell-type labels from cell embeddings, trained model vs the same one at random init.

    python evaluate.py runs/train_sample_<time>/final_model            # bundled PBMC cells, obs['bulk_labels']

The cells of an `.h5ad` are tokenized with the model's vocabulary and the given gene medians, embedded with
embed.py (mean of the second-to-last layer's gene states), and classified by a k-nearest-neighbour vote (cosine
distance) in stratified 5-fold cross-validation. The same architecture with freshly initialised weights (same seed
as training) gives the baseline: the gap is what pretraining added. Prints one table; `--out` writes it as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from biorecipes_shared import ConfigError, atomic_write_json, run_cli
from embed import embed_cells, load_model, tokenize_h5ad
from model import BertForMaskedLM
from preprocess import DataError, read_gene_medians, read_vocab

RECIPE_DIR = Path(__file__).resolve().parent


def knn_accuracy(
    embeddings: np.ndarray, labels: np.ndarray, k: int = 10, folds: int = 5, seed: int = 0
) -> tuple[float, float]:
    """Mean and standard deviation over stratified folds of k-NN (cosine) accuracy; embeddings [n_cells, dim]."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    # Classes rarer than the number of folds cannot be stratified: they are kept out of the score.
    names, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, names[counts >= folds])
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(
        KNeighborsClassifier(n_neighbors=k, metric="cosine"), embeddings[keep], labels[keep], cv=splitter
    )
    return float(scores.mean()), float(scores.std())


def read_labels(h5ad: Path, column: str) -> np.ndarray:
    import anndata

    obs = anndata.read_h5ad(h5ad, backed="r").obs
    if column not in obs.columns:
        raise DataError(f"{h5ad}: no obs column {column!r} (has {list(obs.columns)})")
    return obs[column].astype(str).to_numpy()


def random_twin(model: BertForMaskedLM, seed: int) -> BertForMaskedLM:
    """The same architecture with the recipe's initialisation (seeded), as a baseline."""
    torch.manual_seed(seed)
    return BertForMaskedLM(model.config).eval()


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="final_model/ of a training run (or a published folder)")
    parser.add_argument("--h5ad", default=str(RECIPE_DIR / "sample_data" / "pbmc500_counts.h5ad"))
    parser.add_argument("--label", default="bulk_labels", help="obs column with the cell types")
    parser.add_argument("--vocab", help="default: the model folder's vocab.txt")
    parser.add_argument("--gene-medians", default=str(RECIPE_DIR / "sample_data" / "gene_medians.json"))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42, help="seed of the random-init baseline")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.k < 1:
        raise ConfigError(f"--k {args.k} must be at least 1")
    vocab = read_vocab(args.vocab or Path(args.model) / "vocab.txt")
    model = load_model(args.model)
    cells = tokenize_h5ad(args.h5ad, vocab, read_gene_medians(args.gene_medians), model.config.max_position_embeddings)
    labels = read_labels(Path(args.h5ad), args.label)
    special = [i for i, token in enumerate(vocab) if token.startswith("<") and token.endswith(">")]
    result = {"model": str(args.model), "cells": len(labels), "label": args.label, "k": args.k}
    for name, candidate in (("trained", model), ("random init", random_twin(model, args.seed))):
        embeddings = embed_cells(candidate, cells, special_ids=special, progress=False)
        result[name] = knn_accuracy(embeddings, labels, args.k)
    result["majority class"] = (float(np.unique(labels, return_counts=True)[1].max() / len(labels)), 0.0)
    print(f"k-NN ({args.k}, cosine, 5-fold) accuracy of {args.label} on {len(labels)} cells:")
    for name in ("trained", "random init", "majority class"):
        print(f"  {name:12s} {result[name][0]:.3f} ± {result[name][1]:.3f}")
    if args.out:
        atomic_write_json(args.out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run(argv) and None, user_errors=(DataError,))


if __name__ == "__main__":
    sys.exit(main())
