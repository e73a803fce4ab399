#!/usr/bin/env bash
# Out-of-the-box CPU run (`make train recipe=esm2_fa`): preprocess the bundled proteins, train a tiny ESM-2,
# print the loss falling, export outputs/tiny_cpu/final_model/. About 1.5-2 minutes on 2 idle CPU cores.
# Like train.py itself, running it again continues an interrupted run and is a no-op for a finished one
# (delete outputs/tiny_cpu to start over). Extra arguments go to train.py, e.g. training.max_steps=40.
set -euo pipefail
cd "$(dirname "$0")"

for split in train val; do
  # data_processing.py publishes a shard dir only when complete, so an existing one is the full preprocessing.
  [ -d "outputs/sample_shards/${split}" ] || python src/data_processing.py --config src/config_tiny_cpu.yaml \
    --input_fasta "sample_data/${split}.fasta" --output_dir "outputs/sample_shards/${split}" \
    --max_aa_length 510 --chunk_size 2000 --shard_size 500
done

python src/train.py --config src/config_tiny_cpu.yaml \
  --train_dir outputs/sample_shards/train --val_dir outputs/sample_shards/val "$@"
