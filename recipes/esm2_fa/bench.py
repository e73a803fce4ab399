"""CPU benchmark of the recipe against its baselines, measured in the same run (`make bench recipe=esm2_fa`).

    python bench.py                # ~3-5 minutes on 2 CPU cores
    python bench.py --repeats 7 --model esm2_t12_35M

1. padding efficiency (real / padded tokens) of token-budget batches vs fixed-size batches, on the sample FASTA
   (and on 10,000 real UniRef sequences when ../shared/data is present);
2. preprocessing throughput vs the same pipeline with a per-sequence `EsmTokenizer` loop;
3. streaming-loader tokens/s;
4. training tokens/s (forward + backward + AdamW) and inference tokens/s of the recipe's step vs plain transformers 5
   `EsmForMaskedLM` with SDPA (the current peer) at the same size, same weights, same real batches;
5. the speed switches (bench_switches.py): torch.compile on/off tokens/s, activation checkpointing on/off peak memory
   and tokens/s at the same batch;
6. with a CUDA GPU only: flash_attention_2 vs SDPA vs eager tokens/s and peak memory at --gpu_model (bf16);
7. the preprocessing scale section (bench_scale.py): peak RSS at 1x / 10x, 1 vs 2 processes, UniRef50 estimate.
Timed pairs are interleaved after a warm-up; each figure is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from biorecipes_shared import interleaved_medians

RECIPE_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(RECIPE_DIR / "src"))

import bench_scale  # noqa: E402
import bench_switches  # noqa: E402
from data import ShardStream  # noqa: E402
from data_processing import chunk_protein, pack_batches, preprocess_fasta, read_fasta, tokenize  # noqa: E402
from model import MaskedLMLoss, build_model, esm2_config, masked_lm_loss, save_tokenizer  # noqa: E402
from run_state import fused_adamw_supported  # noqa: E402

SAMPLE = RECIPE_DIR / "sample_data" / "train.fasta"
BUDGET, SAMPLE_BUDGET, MAX_AA, WINDOW, FIXED_BATCH = 16384, 4096, 1022, 10_000, 32


def padding_efficiency(lengths: list[int], budget: int) -> tuple[float, float]:
    """(token-budget batches, fixed-size batches of FIXED_BATCH in input order): real / padded tokens."""
    real = sum(lengths)
    budget_padded = 0
    for start in range(0, len(lengths), WINDOW):
        window = lengths[start : start + WINDOW]
        budget_padded += sum(len(b) * max(window[i] for i in b) for b in pack_batches(window, budget))
    fixed_padded = sum(
        len(lengths[i : i + FIXED_BATCH]) * max(lengths[i : i + FIXED_BATCH])
        for i in range(0, len(lengths), FIXED_BATCH)
    )
    return real / budget_padded, real / fixed_padded


def token_lengths(sequences) -> list[int]:
    return [len(tokenize(c)) for i, s in enumerate(sequences) for c in chunk_protein(f">{i}", s, MAX_AA)]


def uniref_sequences() -> list[str] | None:
    for parent in RECIPE_DIR.parents:
        path = parent / "shared" / "data" / "uniref_10k" / "train.parquet"
        if path.is_file():
            import pyarrow.parquet as pq

            return pq.read_table(path, columns=["sequence"])["sequence"].to_pylist()
    return None


def bench_preprocessing(fasta: Path, tmp: Path, repeats: int) -> tuple[float, float, int]:
    """Proteins/s of the whole preprocess_fasta (1 process) vs only tokenizing the same chunks with a
    per-sequence EsmTokenizer loop (the baseline does less work: no parsing, packing or writing)."""
    tokenizer = save_tokenizer(tmp / "tokenizer")
    chunks = [c for header, seq in read_fasta(fasta) for c in chunk_protein(header, seq, MAX_AA)]
    runs = iter(range(10**6))

    def recipe():
        preprocess_fasta(fasta, tmp / f"pp{next(runs)}", WINDOW, 50_000, MAX_AA, BUDGET, 1026, progress=False)

    def tokenizer_loop():
        for chunk in chunks:
            ids = tokenizer(chunk.residues, add_special_tokens=False)["input_ids"]
            np.array(([0] if chunk.bos else []) + ids + ([2] if chunk.eos else []), np.int8)

    n = sum(1 for _ in read_fasta(fasta))
    t = interleaved_medians({"recipe": recipe, "loop": tokenizer_loop}, repeats)
    return n / t["recipe"], n / t["loop"], n


def bench_loader(train_dir: Path, n_batches: int = 200) -> float:
    """Real (unpadded) tokens/s that one streaming reader delivers, masking included."""
    stream = iter(ShardStream(train_dir, 0, 1, 0, 0.2))
    next(stream)
    start, tokens = time.perf_counter(), 0
    for _, batch in zip(range(n_batches), stream):
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def bench_training(train_dir: Path, model_name: str, repeats: int, n_batches: int = 3) -> dict[str, float]:
    """Real tokens/s of the recipe's training step and evaluation forward vs plain transformers 5 with SDPA.

    Both are transformers' EsmForMaskedLM with SDPA, from the same weights, on the same real batches. The recipe's
    step: loss from the LM head on the masked positions only (model.MaskedLMLoss) + fused AdamW (what
    make_optimizer picks here); the baseline: `model(...).logits` over every position + torch's default AdamW.
    Inference: the masked-LM loss under no_grad, the same way round. Interleaved, medians of `repeats`.
    """
    stream = iter(ShardStream(train_dir, 0, 1, 0, 0.2))
    batches = [next(stream) for _ in range(n_batches)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    torch.manual_seed(0)
    baseline = build_model(esm2_config(model_name), attention="sdpa")
    recipe = build_model(esm2_config(model_name), attention="sdpa")
    recipe.load_state_dict(baseline.state_dict())
    recipe_loss = MaskedLMLoss(recipe)
    fused = fused_adamw_supported(torch.device("cpu"))
    optimizers = {
        "recipe": torch.optim.AdamW(recipe.parameters(), lr=1e-4, fused=fused),
        "transformers_sdpa": torch.optim.AdamW(baseline.parameters(), lr=1e-4),
    }
    losses = {"recipe": lambda b: recipe_loss(**b), "transformers_sdpa": lambda b: masked_lm_loss(baseline, b)}

    def train(name):
        def call():
            for batch in batches:
                losses[name](batch).backward()
                optimizers[name].step()
                optimizers[name].zero_grad(set_to_none=True)

        return call

    def infer(name):
        def call():
            with torch.no_grad():
                for batch in batches:
                    losses[name](batch)

        return call

    times = interleaved_medians(
        {f"train_{n}": train(n) for n in losses} | {f"infer_{n}": infer(n) for n in losses}, repeats
    )
    return {name: tokens / seconds for name, seconds in times.items()}


def bench_gpu_backends(train_dir: Path, model_name: str, repeats: int, device: str = "cuda") -> dict[str, tuple]:
    """{backend: (tokens/s, peak GiB)} for flash-attn / SDPA / eager, bf16 autocast, one backend at a time."""
    stream = iter(ShardStream(train_dir, 0, 1, 0, 0.2))
    batches = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(3)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    backends = ["flash_attention_2", "sdpa", "eager"] if device == "cuda" else ["sdpa", "eager"]
    results = {}
    for backend in backends:
        try:
            model = build_model(esm2_config(model_name), attention=backend).to(device)
        except ValueError as err:  # e.g. flash-attn not installed
            print(f"{backend}: skipped ({err})")
            continue
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def steps(model=model, optimizer=optimizer):
            for batch in batches:
                with torch.autocast(device, dtype=torch.bfloat16):
                    loss = masked_lm_loss(model, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = interleaved_medians({backend: steps}, repeats)[backend]
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        results[backend] = (tokens / seconds, peak)
        del model, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def padding_rows() -> tuple[list[tuple[str, str]], tuple[float, float]]:
    """Padding efficiency of token-budget batches vs fixed 32-sequence batches: sample (both budgets), UniRef 10k."""
    rows = []
    sample_lengths = token_lengths(s for _, s in read_fasta(SAMPLE))
    # The sample run's budget (config_tiny_cpu.yaml) and the production default (config.yaml).
    budget_eff, fixed_eff = padding_efficiency(sample_lengths, SAMPLE_BUDGET)
    rows.append(
        (
            f"padding efficiency, sample, {SAMPLE_BUDGET} tokens (budget / fixed 32)",
            f"{budget_eff:.3f} / {fixed_eff:.3f}",
        )
    )
    big_eff, _ = padding_efficiency(sample_lengths, BUDGET)
    rows.append(
        (f"padding efficiency, sample, {BUDGET} tokens (budget / fixed 32)", f"{big_eff:.3f} / {fixed_eff:.3f}")
    )
    uniref = uniref_sequences()
    if uniref is not None:
        u_budget, u_fixed = padding_efficiency(token_lengths(uniref), BUDGET)
        rows.append(
            (f"padding efficiency, UniRef 10k, {BUDGET} tokens (budget / fixed 32)", f"{u_budget:.3f} / {u_fixed:.3f}")
        )
    return rows, (budget_eff, fixed_eff)


def print_report(rows, budget_eff: float, fixed_eff: float, preprocess_ratio: float, loader_rate: float, train) -> None:
    """The table, then the headline ratios against the baselines of the same run."""
    width = max(len(name) for name, _ in rows)
    print(f"\n{'measure'.ljust(width)}  value\n{'-' * width}  -----")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    print(
        f"\nheadline: padding efficiency {budget_eff:.3f} on the sample (goal >= 0.97; fixed-size batches {fixed_eff:.3f})"
    )
    print(f"headline: preprocessing {preprocess_ratio:.1f}x a per-sequence tokenizer loop alone (goal >= 5x)")
    print(f"headline: loader {loader_rate / train['train_recipe']:.0f}x the tokens/s the CPU training step consumes")
    version = transformers.__version__
    ratio = train["train_recipe"] / train["train_transformers_sdpa"]
    print(f"headline: training step {ratio:.2f}x transformers {version} EsmForMaskedLM + SDPA on CPU (goal >= 1.2x)")
    ratio = train["infer_recipe"] / train["infer_transformers_sdpa"]
    print(f"headline: inference (masked-LM loss) {ratio:.2f}x transformers {version} EsmForMaskedLM + SDPA on CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description="esm2_fa CPU benchmark")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="esm2_t6_8M", help="ESM-2 size for the training comparison")
    parser.add_argument("--train_budget", type=int, default=2048, help="tokens per training batch (CPU-sized)")
    parser.add_argument("--gpu_model", default="esm2_t33_650M", help="size for the GPU back-end comparison")
    parser.add_argument("--gpu_budget", type=int, default=16384, help="tokens per batch on the GPU")
    parser.add_argument("--switches", type=int, default=1, help="1: run the compile / activation-checkpointing section")
    parser.add_argument("--scale_proteins", type=int, default=20_000, help="1x corpus of the scale section (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, (budget_eff, fixed_eff) = padding_rows()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sample = tmp / SAMPLE.name  # a copy: preprocessing writes <name>_refined.fasta next to its input
        sample.write_bytes(SAMPLE.read_bytes())
        recipe_rate, loop_rate, n = bench_preprocessing(sample, tmp, args.repeats)
        rows.append(
            (
                f"preprocessing proteins/s, {n} proteins (recipe / tokenizer loop)",
                f"{recipe_rate:,.0f} / {loop_rate:,.0f}",
            )
        )
        train_dir = tmp / "train_shards"
        preprocess_fasta(sample, train_dir, WINDOW, 400, MAX_AA, args.train_budget, 1026, progress=False)
        loader_rate = bench_loader(train_dir)
        rows.append(("loader tokens/s (1 reader, masking incl.)", f"{loader_rate:,.0f}"))
        train = bench_training(train_dir, args.model, args.repeats)
        for kind in ("train", "infer"):
            rows.append(
                (
                    f"{kind} tokens/s, {args.model}, {args.train_budget}-token batches (recipe / transformers SDPA)",
                    f"{train[f'{kind}_recipe']:,.0f} / {train[f'{kind}_transformers_sdpa']:,.0f}",
                )
            )
        if torch.cuda.is_available():  # flash-attn vs SDPA vs eager, as BENCHMARKS.md asks (sequential, bf16)
            gpu_dir = tmp / "gpu_shards"
            preprocess_fasta(sample, gpu_dir, WINDOW, 400, MAX_AA, args.gpu_budget, 1026, progress=False)
            name = torch.cuda.get_device_name()
            for backend, (rate, peak) in bench_gpu_backends(gpu_dir, args.gpu_model, args.repeats).items():
                rows.append(
                    (f"GPU {name}, {args.gpu_model}, {backend}: tokens/s, peak GiB", f"{rate:,.0f}, {peak:.1f}")
                )
    print_report(rows, budget_eff, fixed_eff, recipe_rate / loop_rate, loader_rate, train)
    if args.switches:
        bench_switches.main(["--model", args.model, "--repeats", str(args.repeats)])
    if args.scale_proteins:
        bench_scale.main(["--proteins", str(args.scale_proteins), "--repeats", str(args.repeats)])


if __name__ == "__main__":
    main()
