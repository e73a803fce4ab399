"""CPU benchmark of the recipe (`make bench recipe=omnibiote`), on the bundled real sample.

1. Shard-writer tokenization (encode_shards, MB of residues per second) with 2 processes vs one, and against bare
   sentencepiece calls that write nothing (the writer's overhead).
2. Loader: packed, masked batches per second, as a multiple of what the training step below consumes.
3. Training tokens/s (forward + backward + MuAdamW step) with SDPA attention vs the math path (--disable_flash).
4. The preprocessing scale section (bench_scale.py): peak RSS at 1x / 10x, 1 vs 2 processes, gzip-decode ceiling
   and the extrapolated GenBank / UniRef100 wall time (`python bench.py --no-scale` skips it).
Each pair is measured interleaved after a warm-up, median of REPEATS; ratios are the headline, not seconds.
"""

import sys
import tempfile
from pathlib import Path

import torch
from mup import MuAdamW

import bench_scale
from biorecipes_shared.logging_utils import interleaved_medians
from data import PackedMLMBatcher, check_fingerprint, load_split
from model import OmniBioTA, OmniBioTAConfig
from preprocessing.encode_shards import encode_shards
from preprocessing.preprocess_genbank import preprocess_genbank
from preprocessing.preprocess_uniprot import preprocess_uniprot
from preprocessing.shards import ShardWriter, iter_shard_records
from tokenizer import OmniTokenizer

HERE = Path(__file__).resolve().parent
SAMPLE = HERE / "sample_data"
REPEATS = 5
PROCS = 2  # the multi-process figure (all preprocessing steps take --num_proc)


def bench_tokenization(work: Path) -> dict[str, float]:
    """MB/s of encode_shards with 2 processes and with one, and of bare sentencepiece calls (no writing)."""
    genbank = preprocess_genbank([SAMPLE / "raw" / "BGC0001090.gbk.gz"], work / "records", split_length=2000)
    uniprot, _ = preprocess_uniprot([SAMPLE / "raw" / "HG003687_proteins.faa.gz"], work / "records")
    # the sample repeated 8 times (about 2 MB), so that per-call fixed costs do not dominate
    with ShardWriter(work / "bigger", "repeated") as repeated:
        for copy in range(8):
            for modality, record_id, sequence in iter_shard_records(genbank.shard_paths + uniprot.shard_paths):
                repeated.add(modality, f"{record_id}#{copy}", sequence)
    shards = repeated.shard_paths
    tokenizer = OmniTokenizer(SAMPLE / "encoded" / "tokenizer.model")
    runs = iter(range(10**6))

    def shard_writer(procs):
        encode_shards(shards, tokenizer.model_file, work / f"enc{next(runs)}", "all", 0.1, num_proc=procs)

    def bare_encode():
        for modality, _, sequence in iter_shard_records(shards):
            [tokenizer.modality_ids[modality], *tokenizer.sp.encode(sequence), tokenizer.eos_id]

    seconds = interleaved_medians(
        {
            "writer_procs": lambda: shard_writer(PROCS),
            "writer_1_proc": lambda: shard_writer(1),
            "bare_encode": bare_encode,
        }
    )
    return {name: repeated.n_chars / 1e6 / value for name, value in seconds.items()}


def training_step(model, optimizer, batch):
    loss = model(**batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    torch.manual_seed(0)
    tokenizer = OmniTokenizer(SAMPLE / "encoded" / "tokenizer.model")
    with tempfile.TemporaryDirectory() as tmp:
        mbs = bench_tokenization(Path(tmp))

    ctx_len, mini_batch = 1024, 2  # the original's context length, where attention matters
    sources = load_split(SAMPLE / "encoded", "train")
    check_fingerprint(sources.values(), tokenizer)
    batcher = PackedMLMBatcher(
        sources, {"genbank": 0.5, "uniprot": 0.5}, ctx_len, mini_batch, tokenizer, torch.Generator().manual_seed(0)
    )
    batch = batcher.next_batch()
    models = {}
    for impl in ("sdpa", "math"):
        torch.manual_seed(0)
        config = OmniBioTAConfig(
            vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_embd=128, ctx_len=ctx_len, attn_impl=impl
        )
        model = OmniBioTA(config)
        models[impl] = (model, MuAdamW(model.parameters(), lr=1e-3))
    step_seconds = interleaved_medians(
        {impl: lambda m=m, o=o: training_step(m, o, batch) for impl, (m, o) in models.items()}
    )
    loader_seconds = interleaved_medians({"loader": lambda: [batcher.next_batch() for _ in range(20)]})["loader"] / 20
    tokens = ctx_len * mini_batch

    print(f"omnibiote CPU benchmark (torch {torch.__version__}, median of {REPEATS} interleaved)")
    print(f"{'measure':52s}{'value':>14s}")
    print(f"{f'tokenization, shard writer, {PROCS} processes (MB/s)':52s}{mbs['writer_procs']:14.2f}")
    print(f"{'tokenization, shard writer, 1 process (MB/s)':52s}{mbs['writer_1_proc']:14.2f}")
    print(f"{'tokenization, bare sentencepiece, no output (MB/s)':52s}{mbs['bare_encode']:14.2f}")
    print(f"{'loader, packed masked batches (tokens/s)':52s}{tokens / loader_seconds:14.0f}")
    print(f"{'training, SDPA attention (tokens/s)':52s}{tokens / step_seconds['sdpa']:14.0f}")
    print(f"{'training, math attention (tokens/s)':52s}{tokens / step_seconds['math']:14.0f}")
    print(
        f"shard writer, {PROCS} processes vs 1: {mbs['writer_procs'] / mbs['writer_1_proc']:.2f}x;"
        f" shard writer (1 process) vs bare sentencepiece: {mbs['writer_1_proc'] / mbs['bare_encode']:.2f}x"
    )
    print(f"loader headroom over the SDPA training step: {step_seconds['sdpa'] / loader_seconds:.1f}x")
    print(f"training tokens/s, SDPA vs math attention: {step_seconds['math'] / step_seconds['sdpa']:.2f}x")
    if "--no-scale" not in sys.argv:
        bench_scale.main([])


if __name__ == "__main__":
    main()
