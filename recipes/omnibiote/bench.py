"""CPU benchmark of the recipe (`make bench recipe=omnibiote`), on the bundled real sample.

1. Shard-writer tokenization (encode_shards, MB of residues per second) with 2 processes vs one, and against bare
   sentencepiece calls that write nothing (the writer's overhead).
2. Loader: packed, masked batches per second, as a multiple of what the training step below consumes.
3. Training tokens/s (forward + backward + MuAdamW step) with SDPA attention vs the math path (--disable_flash).
4. The two switches: --compile (blocks compiled) vs eager tokens/s on the model of 3, and --activation_checkpointing
   vs not on a larger model at the same batch: tokens/s (interleaved) and peak RSS (a fresh process per variant, so
   one variant's peak cannot hide the other's). Real tokens only (the packed batches here have no padding).
5. The preprocessing scale section (bench_scale.py): peak RSS at 1x / 10x, 1 vs 2 processes, gzip-decode ceiling
   and the extrapolated GenBank / UniRef100 wall time (`python bench.py --no-scale` skips it).
Each pair is measured interleaved after a warm-up, median of REPEATS; ratios are the headline, not seconds.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import torch
from mup import MuAdamW

import bench_scale
from biorecipes_shared import interleaved_medians
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


AC_SHAPE = dict(n_layer=4, n_head=4, n_embd=256)  # activations, not weights, dominate memory at 4 x 1,024 tokens
AC_BATCH = 4


def speedup_models(tokenizer, ctx_len: int, shape: dict, variants: dict) -> dict:
    """{name: (model, optimizer)} with the same initial weights, each with its enable_speedups switches."""
    models = {}
    for name, switches in variants.items():
        torch.manual_seed(0)
        config = OmniBioTAConfig(vocab_size=tokenizer.vocab_size, ctx_len=ctx_len, **shape)
        model = OmniBioTA(config).enable_speedups(**switches)
        models[name] = (model, MuAdamW(model.parameters(), lr=1e-3))
    return models


def peak_rss_probe(variant: str) -> None:
    """Child process of bench_speedups: RSS after set-up, peak RSS over 3 training steps (GiB), as one JSON line."""
    tokenizer, batcher = sample_batcher(1024, AC_BATCH)
    batch = batcher.next_batch()
    switches = {"activation_checkpointing": variant == "recompute"}
    model, optimizer = speedup_models(tokenizer, 1024, AC_SHAPE, {variant: switches})[variant]
    base = psutil.Process().memory_info().rss / 2**30
    for _ in range(3):
        training_step(model, optimizer, batch)
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's RSS at fork into the child's ru_maxrss
    status = Path("/proc/self/status").read_text().splitlines()
    peak = int(next(line.split()[1] for line in status if line.startswith("VmHWM"))) / 2**20  # KiB
    print(json.dumps({"base_rss_gib": base, "peak_rss_gib": peak}))


def bench_speedups(tokenizer, batch) -> dict[str, float]:
    """Tokens/s of compiled vs eager (model of section 3) and of activation checkpointing vs not (AC_SHAPE), peak
    RSS of the latter two from fresh processes."""
    ctx_len, rows = batch["input_ids"].shape[1], batch["input_ids"].shape[0]
    small = dict(n_layer=2, n_head=4, n_embd=128)
    models = speedup_models(tokenizer, ctx_len, small, {"eager": {}, "compiled": {"compile_blocks": True}})
    seconds = interleaved_medians({n: lambda m=m, o=o: training_step(m, o, batch) for n, (m, o) in models.items()})
    out = {f"{name}_tokens_per_s": rows * ctx_len / value for name, value in seconds.items()}
    big_batch = sample_batcher(ctx_len, AC_BATCH)[1].next_batch()  # the batch the RSS probes train on
    variants = {"plain": {}, "recompute": {"activation_checkpointing": True}}
    models = speedup_models(tokenizer, ctx_len, AC_SHAPE, variants)
    seconds = interleaved_medians({n: lambda m=m, o=o: training_step(m, o, big_batch) for n, (m, o) in models.items()})
    out.update({f"ac_{name}_tokens_per_s": AC_BATCH * ctx_len / value for name, value in seconds.items()})
    del models
    for variant in ("plain", "recompute"):
        probe = subprocess.run(
            [sys.executable, __file__, "--peak-rss-probe", variant], capture_output=True, text=True, check=True
        )
        for key, value in json.loads(probe.stdout.strip().splitlines()[-1]).items():
            out[f"ac_{variant}_{key}"] = value
    return out


def sample_batcher(ctx_len: int, mini_batch: int):
    """The bundled sample's tokenizer and a seeded batcher of packed, masked rows."""
    tokenizer = OmniTokenizer(SAMPLE / "encoded" / "tokenizer.model")
    sources = load_split(SAMPLE / "encoded", "train")
    check_fingerprint(sources.values(), tokenizer)
    generator = torch.Generator().manual_seed(0)
    return tokenizer, PackedMLMBatcher(
        sources, {"genbank": 0.5, "uniprot": 0.5}, ctx_len, mini_batch, tokenizer, generator
    )


def report(mbs: dict, tokens: int, loader_seconds: float, step_seconds: dict, fast: dict) -> None:
    """The table, then the headline ratios."""
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
    print(f"{'training, blocks compiled (--compile) (tokens/s)':52s}{fast['compiled_tokens_per_s']:14.0f}")
    print(f"{'training, eager, same model (tokens/s)':52s}{fast['eager_tokens_per_s']:14.0f}")
    for name, label in (("plain", "without"), ("recompute", "with")):
        print(
            f"{f'4x256 model, {label} activation checkpointing (tokens/s)':52s}{fast[f'ac_{name}_tokens_per_s']:14.0f}"
        )
        print(f"{'  peak RSS / RSS after set-up (GiB)':52s}{fast[f'ac_{name}_peak_rss_gib']:7.2f}"
              f"{fast[f'ac_{name}_base_rss_gib']:7.2f}")  # fmt: skip
    print(f"training tokens/s, SDPA vs math attention: {step_seconds['math'] / step_seconds['sdpa']:.2f}x")
    print(f"training tokens/s, --compile vs eager: {fast['compiled_tokens_per_s'] / fast['eager_tokens_per_s']:.2f}x")
    ac_rss = [fast[f"ac_{n}_peak_rss_gib"] - fast[f"ac_{n}_base_rss_gib"] for n in ("plain", "recompute")]
    print(
        f"activation checkpointing vs not: tokens/s {fast['ac_recompute_tokens_per_s'] / fast['ac_plain_tokens_per_s']:.2f}x,"
        f" peak RSS {fast['ac_recompute_peak_rss_gib'] / fast['ac_plain_peak_rss_gib']:.2f}x"
        f" (above set-up: {ac_rss[1] / ac_rss[0]:.2f}x)"
    )


def main() -> None:
    torch.manual_seed(0)
    tokenizer = OmniTokenizer(SAMPLE / "encoded" / "tokenizer.model")
    with tempfile.TemporaryDirectory() as tmp:
        mbs = bench_tokenization(Path(tmp))

    ctx_len, mini_batch = 1024, 2  # the original's context length, where attention matters
    tokenizer, batcher = sample_batcher(ctx_len, mini_batch)
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
    fast = bench_speedups(tokenizer, batch)
    tokens = ctx_len * mini_batch

    report(mbs, tokens, loader_seconds, step_seconds, fast)
    if "--no-scale" not in sys.argv:
        bench_scale.main([])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-rss-probe":
        peak_rss_probe(sys.argv[2])
    else:
        main()
