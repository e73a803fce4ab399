#!/usr/bin/env bash
# Out-of-the-box CPU run (`make train recipe=esm2_fa`): preprocess the bundled proteins, train a tiny ESM-2,
# print the loss falling, export outputs/tiny_cpu/final_model/. About 1.5-2 minutes on 2 idle CPU cores.
set -euo pipefail
cd "$(dirname "$0")"

rm -rf outputs/sample_shards outputs/tiny_cpu   # outputs of a previous sample run only
for split in train val; do
  python src/data_processing.py --config src/config_tiny_cpu.yaml \
    --input_fasta "sample_data/${split}.fasta" --output_dir "outputs/sample_shards/${split}" \
    --max_aa_length 510 --chunk_size 2000 --shard_size 500
done

python src/train.py --config src/config_tiny_cpu.yaml \
  --train_dir outputs/sample_shards/train --val_dir outputs/sample_shards/val "$@"

echo "done: loss curve in outputs/tiny_cpu/loss_curve.png, model in outputs/tiny_cpu/final_model/"
