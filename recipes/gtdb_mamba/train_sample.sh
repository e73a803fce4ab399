#!/usr/bin/env bash
# Out-of-the-box run (`make train recipe=gtdb_mamba`): generate the GTDB-layout fixture (first time only), then train
# the tiny `sample` config on it. Each call writes a fresh run directory under runs/; extra args are Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")"
# One compute thread: with the loader worker beside it this fills 2 cores; more threads thrash on a busy machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python scripts/build_sample.py --out fixture
python train.py --config-name sample "output_dir=runs/sample-$(date +%Y%m%d-%H%M%S)" "$@"
