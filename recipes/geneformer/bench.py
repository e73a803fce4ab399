"""CPU benchmark: this recipe's Geneformer against transformers' BertForMaskedLM (SDPA attention, the current peer),
and its own switches (training.compile, training.activation_checkpointing), each against its baseline in the same run.

    python bench.py                 # ~10 minutes on 2 cores; uses real Genecorpus cells when ../shared/data has them
    python bench.py --no-scale      # without the data-at-scale section (bench_scale.py, ~10 more minutes)

Rows (median of REPEATS, interleaved A/B after a warm-up, same batches, same weights, real tokens counted):
  train step     forward+backward as train.py runs it (loss on the masked tokens only) vs transformers (labels given)
  same work      forward+backward, both computing logits for every token (isolates the encoder implementation)
  inference      forward only, logits for every token
  compile        the recipe's train step with training.compile (each encoder layer compiled) vs eager
  act. ckpt      the recipe's train step with training.activation_checkpointing vs without, same batch
  act. ckpt RSS  peak RSS of one fresh process per variant (two train steps of the 10m model, 4 x 2,048 real tokens)
  tokenizer      preprocess.py rank-value encoding of the bundled real PBMC counts, cells/s
Then the batching modes (bench_batching.py) and, unless --no-scale, the data at scale (bench_scale.py).
"""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

RECIPE_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(RECIPE_DIR))

from biorecipes_shared import interleaved_medians  # noqa: E402
from data import CellDataset, MaskingCollator  # noqa: E402
from dictionaries import read_gene_medians, read_vocab  # noqa: E402
from model import BertForMaskedLM, configure_layers, geneformer_config  # noqa: E402
from readers import open_source  # noqa: E402
from tokenize_cells import Encoder, GeneColumns, normalise  # noqa: E402

REPEATS = 5
SEQ_LEN, BATCH = 256, 8
RSS_SEQ_LEN, RSS_BATCH = 2048, 4  # the 10m config's context, as issue 20 sets the activation-memory target
VOCAB_10M = 25_426
SIZE = {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 512}  # 10m


def find_cells() -> tuple[Path, Path, str]:
    """Real Genecorpus cells (25,426-gene vocabulary) when available, else the bundled PBMC sample."""
    shared = Path(os.environ.get("BIORECIPES_SHARED_DATA", RECIPE_DIR.parents[2] / "shared" / "data"))
    corpus = shared / "genecorpus_500"
    if (corpus / "genecorpus_500_samples.parquet").is_file():
        return corpus / "genecorpus_500_samples.parquet", corpus / "vocab.txt", "Genecorpus-30M cells"
    return RECIPE_DIR / "sample_data" / "cells.parquet", RECIPE_DIR / "sample_data" / "vocab.txt", "bundled PBMC cells"


def config_10m(vocab_size: int, max_positions: int):
    return geneformer_config(
        vocab_size,
        hidden_act="relu",
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.02,
        attention_probs_dropout_prob=0.02,
        **SIZE,
    )


def train_step(model, **batch):
    def run():
        model.train()
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    return run


def infer(model, **batch):
    def run():
        model.eval()
        with torch.no_grad():
            model(**batch)

    return run


def rates(functions: dict, tokens: int, warmup: int = 1) -> dict[str, float]:
    """Real tokens per second of each callable (interleaved medians)."""
    return {name: tokens / seconds for name, seconds in interleaved_medians(functions, REPEATS, warmup).items()}


def model_rows(ours, theirs, batch: dict) -> list[tuple[str, str, float, str, float]]:
    """(row, variant, tokens/s, baseline, tokens/s) for the peer comparison and the two switches."""
    tokens = int(batch["attention_mask"].sum())
    hf_batch = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
    no_labels = {key: batch[key] for key in ("input_ids", "attention_mask")}
    rows = []
    pairs = [
        ("train step", train_step(ours, **batch, masked_logits_only=True), train_step(theirs, **hf_batch)),
        ("same work", train_step(ours, **batch), train_step(theirs, **hf_batch)),
        ("inference", infer(ours, **no_labels), infer(theirs, **no_labels)),
    ]
    for name, mine, peer in pairs:
        got = rates({"recipe": mine, "transformers": peer}, tokens)
        rows.append((name, "recipe", got["recipe"], "transformers sdpa", got["transformers"]))
    compiled = copy.deepcopy(ours)
    configure_layers(compiled, compile=True)
    got = rates(  # two warm-ups: the first compiles forward and backward
        {
            "on": train_step(compiled, **batch, masked_logits_only=True),
            "off": train_step(ours, **batch, masked_logits_only=True),
        },
        tokens,
        warmup=2,
    )
    rows.append(("compile", "compiled", got["on"], "eager", got["off"]))
    checkpointed = copy.deepcopy(ours)
    configure_layers(checkpointed, activation_checkpointing=True)
    got = rates(
        {
            "on": train_step(checkpointed, **batch, masked_logits_only=True),
            "off": train_step(ours, **batch, masked_logits_only=True),
        },
        tokens,
    )
    rows.append(("act. ckpt", "on", got["on"], "off", got["off"]))
    return rows


def rss_child(variant: str) -> None:
    """One fresh process: two train steps of the 10m model at RSS_BATCH x RSS_SEQ_LEN; prints peak RSS and the
    second step's real tokens/s as JSON."""
    torch.manual_seed(0)
    model = BertForMaskedLM(config_10m(VOCAB_10M, RSS_SEQ_LEN))
    configure_layers(model, activation_checkpointing=variant == "on")
    input_ids = torch.randint(4, VOCAB_10M, (RSS_BATCH, RSS_SEQ_LEN))
    labels = torch.where(torch.rand(input_ids.shape) < 0.15, input_ids, -100)
    step = train_step(model, input_ids=input_ids, labels=labels, masked_logits_only=True)
    step()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_gib": peak_kib / 2**20, "tokens_per_s": input_ids.numel() / seconds}))


def rss_rows() -> dict[str, dict]:
    """Activation checkpointing off and on, each in its own fresh process (peak RSS is per process)."""
    results = {}
    for variant in ("off", "on"):
        # A fixed glibc mmap threshold, so the high-water mark measures the tensors alive at once, not which freed
        # blocks the allocator kept (esm2_fa's probe read 0.55-0.72x over identical runs without it).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", variant], capture_output=True, text=True, check=True, env=env
        ).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    return results


def tokenizer_rate() -> float:
    counts = open_source(RECIPE_DIR / "sample_data" / "pbmc500_counts.h5ad")
    block = counts.read_block(0, counts.n_rows)
    columns = GeneColumns.of(counts.gene_ids, keep_version=False)
    normalised = normalise(columns.apply(block.counts), block.totals, block.cell_ids, str(counts.path))
    medians = read_gene_medians(RECIPE_DIR / "sample_data" / "gene_medians.json")
    encoder = Encoder.of(columns.genes, ["<pad>", "<mask>", *sorted(medians)], medians, "v1", 2048, False)
    seconds = interleaved_medians({"encode": lambda: encoder.encode(normalised)}, REPEATS)["encode"]
    return len(block.cell_ids) / seconds


def main() -> None:
    torch.manual_seed(0)
    cells_path, vocab_path, source = find_cells()
    vocab = read_vocab(vocab_path)
    config = config_10m(len(vocab), SEQ_LEN)
    ours = BertForMaskedLM(config)
    # The peer a current user would pick: transformers 5's BERT with SDPA attention (not eager).
    theirs = transformers.BertForMaskedLM._from_config(config, attn_implementation="sdpa")
    assert theirs.config._attn_implementation == "sdpa", theirs.config._attn_implementation
    theirs.load_state_dict(ours.state_dict())
    dataset = CellDataset(cells_path, len(vocab), SEQ_LEN)
    batch = MaskingCollator(vocab, pad_to_multiple_of=16)([dataset[i] for i in range(BATCH)])
    rows = model_rows(ours, theirs, batch)
    rss = rss_rows()
    cells_per_s = tokenizer_rate()

    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(
        f"Geneformer 10m-size ({params:.1f}M parameters, vocab {len(vocab)}), {BATCH} x {SEQ_LEN} {source}, "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"median of {REPEATS} interleaved"
    )
    print(f"{'row':<11} {'variant':>9} {'tok/s':>8}  {'baseline':>17} {'tok/s':>8} {'ratio':>7}")
    for name, variant, rate, baseline, base_rate in rows:
        print(f"{name:<11} {variant:>9} {rate:>8.0f}  {baseline:>17} {base_rate:>8.0f} {rate / base_rate:>6.2f}x")
    on, off = rss["on"], rss["off"]
    print(
        f"act. ckpt RSS, 10m at {RSS_BATCH} x {RSS_SEQ_LEN} (fresh process each): peak {on['peak_rss_gib']:.2f} GiB "
        f"on vs {off['peak_rss_gib']:.2f} GiB off ({on['peak_rss_gib'] / off['peak_rss_gib']:.2f}x); "
        f"{on['tokens_per_s']:.0f} vs {off['tokens_per_s']:.0f} tokens/s "
        f"({on['tokens_per_s'] / off['tokens_per_s']:.2f}x, one step each)"
    )
    print(f"{'tokenizer':<11} {cells_per_s:>9.0f} cells/s (rank-value encoding, 500 PBMC)")
    train, same, inference, compiled = (rows[i][2] / rows[i][4] for i in range(4))
    print(
        f"headline: train step {train:.2f}x transformers {transformers.__version__} BertForMaskedLM (sdpa) "
        f"(same work {same:.2f}x, inference {inference:.2f}x); compile {compiled:.2f}x eager; activation "
        f"checkpointing peak RSS {on['peak_rss_gib'] / off['peak_rss_gib']:.2f}x"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rss-child"]:
        rss_child(sys.argv[2])
        sys.exit(0)
    main()
    if (RECIPE_DIR / "bench_batching.py").is_file():
        import bench_batching

        print()
        bench_batching.main([])
    if "--no-scale" not in sys.argv[1:]:
        import bench_scale

        print()
        bench_scale.main([])
