"""geneformer's `data.batching` modes on the GPU: the same cells as random padded batches, length-grouped padded
batches and packed rows, through the recipe's own order, packing and collator (issue 20 items 1 and 5).

Cell lengths follow the Genecorpus-like model of issue 20 (lognormal, median ~0.49 x the row length, ~7% at the
cap): the bundled samples do not have the real spread. Each mode trains one pass over the cells (forward + backward,
bf16 on CUDA) after a warm-up batch; real tokens/s and MFU count real (non-padding) tokens only, with the FLOPs of
each cell computed alone (what a padding-free kernel would do), so padding and cross-cell attention earn nothing.
Run with recipes/geneformer as cwd."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from gpu_check.common import CheckFailed, Context, bf16_autocast, synchronize

LENGTH_SIGMA = 0.49  # P(length >= cap) ~ 7% with the median at 0.49 x cap, as Genecorpus-30M at 2,048
MODES = ("random", "length_grouped", "packed")


def cell_lengths(count: int, cap: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(math.log(0.49 * cap), LENGTH_SIGMA, count))
    return np.clip(lengths.round(), 16, cap).astype(np.int64)


def mode_batches(mode: str, cells: list[np.ndarray], lengths: np.ndarray, batch: int, cap: int, collator) -> list:
    """The mode's batches over all cells: lists of cells padded by the collator, or packed rows."""
    from batching import length_grouped_order, pack_rows

    if mode == "packed":
        rows = pack_rows(np.arange(len(cells)), lengths, cap, torch.Generator().manual_seed(0))
        groups = [rows[i : i + batch] for i in range(0, len(rows), batch)]
        return [collator.pack([[cells[c] for c in row] for row in group]) for group in groups]
    if mode == "length_grouped":
        order = length_grouped_order(lengths, epoch=0, seed=0, micro_batch_size=batch)
    else:
        order = np.random.default_rng(0).permutation(len(cells))
    return [collator([cells[c] for c in order[i : i + batch]]) for i in range(0, len(order), batch)]


def real_flops(config, lengths: np.ndarray, mlm_probability: float) -> float:
    """Forward + backward FLOPs of each cell computed alone: 6 x layer parameters per token, 12 x layers x hidden x
    length^2 for attention, 6 x hidden x vocab per masked token for the decoder (embeddings are lookups)."""
    d, layers, ffn = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_token = 6 * layers * (4 * d * d + 2 * d * ffn) + 6 * d * config.vocab_size * mlm_probability
    return float(per_token * lengths.sum() + 12 * layers * d * (lengths.astype(np.float64) ** 2).sum())


def train_pass(ctx: Context, model, batches: list[dict]) -> tuple[float, int, float]:
    """(seconds, token positions computed, mean loss) of one forward + backward over every batch."""
    positions, losses = 0, []
    synchronize(ctx.device)
    start = time.perf_counter()
    for batch in batches:
        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
        with bf16_autocast(ctx.device):
            loss = model(**batch, masked_logits_only=True).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        positions += batch["input_ids"].numel()
        losses.append(loss.detach())
    synchronize(ctx.device)
    return time.perf_counter() - start, positions, float(torch.stack(losses).float().mean())


def batching_row(ctx: Context, spec: dict, build, vocab_size: int) -> tuple[str, dict]:
    """random vs length_grouped vs packed on the same cells: useful-token fraction, real tokens/s, MFU (real)."""
    from data import MaskingCollator
    from packed_attention import segment_kernel

    cap, batch = spec["length"], spec["batch"]
    model = build(spec["config"], spec["layers"], ctx.device, vocab_size).train()
    lengths = cell_lengths(spec["cells"], cap)
    rng = np.random.default_rng(1)
    cells = [rng.integers(2, vocab_size, n) for n in lengths]
    vocab = ["<pad>", "<mask>"] + [f"g{i}" for i in range(2, vocab_size)]
    collator = MaskingCollator(vocab=vocab, generator=torch.Generator().manual_seed(0), max_length=cap)
    flops = real_flops(model.config, lengths, collator.mlm_probability)
    results = {}
    for mode in MODES:
        batches = mode_batches(mode, cells, lengths, batch, cap, collator)
        train_pass(ctx, model, batches[:1])  # warm-up: kernels, allocator
        seconds, positions, loss = train_pass(ctx, model, batches)
        if not math.isfinite(loss):
            raise CheckFailed(f"{mode}: loss {loss}")
        results[mode] = {
            "useful_token_fraction": float(lengths.sum()) / positions,
            "tokens_per_s": float(lengths.sum()) / seconds,
            "mfu_real": flops / seconds / 1e12 / ctx.peak_tflops if ctx.peak_tflops > 0 else float("nan"),
            "batches": len(batches),
            "loss": loss,
        }
    base = results["random"]["tokens_per_s"]
    parts = [
        f"{mode} frac {r['useful_token_fraction']:.2f} {r['tokens_per_s']:,.0f} tok/s (x{r['tokens_per_s'] / base:.2f}) "
        f"MFU {r['mfu_real']:.1%}"
        for mode, r in results.items()
    ]
    kernel = segment_kernel(torch.empty(1, device=ctx.device, dtype=torch.bfloat16 if ctx.is_cuda else torch.float32))
    what = f"{spec['config']} at {cap}, {len(cells)} cells, batch {batch}, packed kernel {kernel}"
    metrics = {f"{mode}_{k}": v for mode, r in results.items() for k, v in r.items()}
    return f"{what}: " + "; ".join(parts), {**metrics, "packed_kernel": kernel, "real_tokens": int(lengths.sum())}
