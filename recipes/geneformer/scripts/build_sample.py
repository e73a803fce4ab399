"""Rebuild `sample_data/` from real PBMC counts shipped inside the scanpy wheel (BSD-3-Clause).

scanpy 1.11.5 bundles `scanpy/datasets/10x_pbmc68k_reduced.h5ad`: 700 human PBMCs x 765 genes (gene symbols). Its
`.raw.X` is log1p of counts scaled to 10,000 per cell, and `obs['n_counts']` keeps each cell's original total, so the
raw counts come back exactly as round(expm1(raw.X) * n_counts / 10,000). We keep the first 500 cells.

    python scripts/build_sample.py                      # downloads the wheel with pip (no install) into a temp dir
    python scripts/build_sample.py --wheel scanpy-1.11.5-py3-none-any.whl

Writes sample_data/pbmc500_counts.h5ad (integer counts) and, through preprocess.py, sample_data/cells.parquet/ (one
shard), vocab.txt, gene_medians.json and metadata.json (which records the input path as given: run from anywhere,
the paths it records are relative to the recipe folder).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

RECIPE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(RECIPE_DIR))

from preprocess import preprocess  # noqa: E402

SCANPY_VERSION = "1.11.5"
H5AD_IN_WHEEL = "scanpy/datasets/10x_pbmc68k_reduced.h5ad"
N_CELLS = 500


def fetch_wheel(directory: Path) -> Path:
    """`pip download` the scanpy wheel without installing it or its dependencies."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", f"scanpy=={SCANPY_VERSION}", "-d", str(directory)],
        check=True,
    )
    return next(directory.glob(f"scanpy-{SCANPY_VERSION}-*.whl"))


def recover_counts(h5ad_path: Path):
    """Undo scanpy's log-normalisation of `.raw` to get integer counts back, as an AnnData of the first N_CELLS."""
    import anndata

    pbmc = anndata.read_h5ad(h5ad_path)
    log_normalised = pbmc.raw.X.toarray().astype(np.float64)
    totals = pbmc.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    counts = np.expm1(log_normalised) * totals / 1e4
    # float32 storage leaves at most ~0.1 of rounding noise; anything larger would mean the recipe above is wrong
    assert np.abs(counts - np.round(counts)).max() < 0.2, "counts are not recoverable from raw.X"
    counts = sp.csr_matrix(np.round(counts[:N_CELLS]).astype(np.int32))
    obs = pbmc.obs.iloc[:N_CELLS][["bulk_labels"]].copy()
    obs["bulk_labels"] = obs["bulk_labels"].astype(str)
    return anndata.AnnData(X=counts, obs=obs, var=pbmc.raw.var[[]].copy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="a local scanpy wheel (default: pip download it)")
    parser.add_argument("--out-dir", type=Path, default=RECIPE_DIR / "sample_data")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(H5AD_IN_WHEEL, tmp)
        counts = recover_counts(Path(tmp) / H5AD_IN_WHEEL)
    out_dir = Path(os.path.relpath(args.out_dir.resolve(), RECIPE_DIR))
    os.chdir(RECIPE_DIR)
    counts_path = out_dir / "pbmc500_counts.h5ad"
    counts.write_h5ad(counts_path, compression="gzip")
    out = preprocess(counts_path, out_dir, max_length=2048, style="v1")
    print(f"wrote {counts_path} and {out}")


if __name__ == "__main__":
    main()
