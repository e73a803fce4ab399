#!/usr/bin/env bash
# Rebuilds sample_data/ from real sequences shipped inside the pyhmmer 0.12.3 wheel (MIT licence):
#   raw/BGC0001090.gbk.gz          MIBiG BGC0001090, 44,660 bp GenBank record (B. amyloliquefaciens FZB42)
#   raw/HG003687_proteins.faa.gz   the first 600 proteins of 938293.PRJEB85.HG003687.faa
#   encoded/                       tokenizer.model (BPE, 512 pieces) + train/val token arrays (genbank, uniprot)
# Run from the recipe folder: bash scripts/build_sample.sh   (needs PyPI access for `pip download`)
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m pip download --no-deps --quiet pyhmmer==0.12.3 -d "$work/wheel"
python - "$work" <<'PY'
import sys, zipfile, pathlib
work = pathlib.Path(sys.argv[1])
wheel = next((work / "wheel").glob("pyhmmer-0.12.3-*.whl"))
with zipfile.ZipFile(wheel) as zf:
    for name in ("BGC0001090.gbk", "938293.PRJEB85.HG003687.faa"):
        (work / name).write_bytes(zf.read(f"pyhmmer/tests/data/seqs/{name}"))
PY
mkdir -p sample_data/raw
gzip -n -9 -c "$work/BGC0001090.gbk" > sample_data/raw/BGC0001090.gbk.gz
awk '/^>/{n++} n<=600' "$work/938293.PRJEB85.HG003687.faa" | gzip -n -9 -c > sample_data/raw/HG003687_proteins.faa.gz

rm -rf sample_data/encoded
# the single 44 kb GenBank record is cut into 2 kb windows so that it can be split into train and val
python -m preprocessing.preprocess_genbank sample_data/raw/BGC0001090.gbk.gz --out_dir "$work/records" --split_length 2000
python -m preprocessing.preprocess_uniprot sample_data/raw/HG003687_proteins.faa.gz --out_dir "$work/records"
python -m preprocessing.train_tokenizer "$work"/records/*.tsv.gz --model_file "$work/tokenizer.model" \
    --vocab_size 512 --model_type bpe --num_threads 2
for source in genbank uniprot; do
    python -m preprocessing.encode_shards "$work/records/${source}"_*.tsv.gz --source "$source" \
        --tokenizer "$work/tokenizer.model" --base_dir sample_data/encoded --val_fraction 0.1 --num_proc 2
done
du -sh sample_data/raw sample_data/encoded
