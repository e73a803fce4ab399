"""omnibiote: SDPA (bf16) vs math attention (fp32) on packed records, the 12 x 768 model at 1,024 tokens, a CLI run.

Run with recipes/omnibiote as cwd. Without flash-attn (not on the image) `attn_impl=auto` is SDPA on CUDA too."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gpu_check import common
from gpu_check.switches import SwitchCase, run_switch_rows
from model import OmniBioTA, OmniBioTAConfig


def build(size: dict, attn_impl: str) -> OmniBioTA:
    config = OmniBioTAConfig(
        vocab_size=size["vocab"],
        n_layer=size["n_layer"],
        n_head=size["n_head"],
        n_embd=size["n_embd"],
        ctx_len=size["length"],
        attn_impl=attn_impl,
    )
    return OmniBioTA(config)


def packed_batch(size: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and doc ids of rows packed with records of random lengths; the last row ends in padding (-1)."""
    batch, length = size["batch"], size["length"]
    ids = torch.randint(4, size["vocab"], (batch, length))
    doc_ids = torch.empty(batch, length, dtype=torch.long)
    for row in range(batch):
        cuts = torch.sort(torch.randint(1, length, (3,))).values.tolist()
        bounds = [0, *cuts, length]
        for doc, (start, end) in enumerate(zip(bounds, bounds[1:])):
            doc_ids[row, start:end] = doc
    ids[-1, length - length // 4 :] = 0  # pad_id
    doc_ids[-1, length - length // 4 :] = -1
    return ids.to(device), doc_ids.to(device)


def parity(ctx: common.Context) -> tuple[str, dict]:
    size = ctx.sizes["parity"]
    fast = build(size, "sdpa").to(ctx.device).eval()
    reference = build(size, "math").to(ctx.device).eval()
    reference.load_state_dict(fast.state_dict())
    ids, doc_ids = packed_batch(size, ctx.device)
    valid = doc_ids >= 0
    # The MuReadout head starts at zero (all logits 0), so the hidden states are what can differ.
    with torch.no_grad():
        with common.bf16_autocast(ctx.device):
            bf16 = fast.hidden_states(ids, doc_ids).float()
        fp32 = fast.hidden_states(ids, doc_ids).float()
        ref = reference.hidden_states(ids, doc_ids).float()
    errors = {
        "bf16 sdpa": common.relative_error(bf16[valid], ref[valid]),
        "fp32 sdpa": common.relative_error(fp32[valid], ref[valid]),
    }
    what = f"SDPA vs math attention, hidden states, packed records + padding, {size['n_layer']} x {size['n_embd']}"
    return common.parity_result(errors, {"bf16 sdpa": common.BF16_TOLERANCE, "fp32 sdpa": common.FP32_TOLERANCE}, what)


def throughput(ctx: common.Context) -> tuple[str, dict]:
    size = ctx.sizes["throughput"]
    model = build(size, "auto").to(ctx.device).train()
    ids, doc_ids = packed_batch(size, ctx.device)
    labels = torch.where(torch.rand(ids.shape, device=ctx.device) < 0.15, ids, torch.full_like(ids, -100))
    labels[doc_ids < 0] = -100
    step = common.fwd_bwd_step(model, lambda: model(ids, doc_ids, labels), ctx.device)
    summary, metrics = common.measure_throughput(ctx, step, ids.numel(), model.num_parameters())
    return f"{size['n_layer']} x {size['n_embd']} at {size['length']}: {summary}", metrics


def train(ctx: common.Context) -> tuple[str, dict]:
    size = ctx.sizes["train"]

    def command(run_dir: Path, stop: bool = False) -> list[str]:
        # the sample settings (configs/sample.yaml) with this check's budget, checkpointing only at the end
        argv = ["train_encoder.py", "--config", "configs/sample.yaml", f"output_dir={run_dir}"]
        argv += [f"token_budget={size['token_budget']}", "test_freq=0", "save_freq=0", "log_freq=1"]
        return argv + ([f"max_steps={size['stop_step']}"] if stop else [])

    spec = common.TrainSpec(full=command, stop=lambda run_dir: command(run_dir, stop=True))
    return common.train_and_resume(ctx, spec, timeout=ctx.sizes["budget_s"])


def switch_case(ctx: common.Context) -> SwitchCase:
    """The throughput model and packed batch; switches: `enable_speedups`, what `--compile` /
    `--activation_checkpointing` call. The model has no dropout."""
    size = ctx.sizes["throughput"]
    ids, doc_ids = packed_batch(size, ctx.device)
    labels = torch.where(torch.rand(ids.shape, device=ctx.device) < 0.15, ids, torch.full_like(ids, -100))
    labels[doc_ids < 0] = -100

    def apply(model: OmniBioTA, compile: bool, activation_checkpointing: bool) -> None:
        model.enable_speedups(compile_blocks=compile, activation_checkpointing=activation_checkpointing)

    return SwitchCase(
        build=lambda: build(size, "auto").to(ctx.device).train(),
        loss=lambda model: model(ids, doc_ids, labels),
        apply=apply,
        tokens=int((doc_ids >= 0).sum()),
        what=f"{size['n_layer']} x {size['n_embd']} at {size['length']}",
    )


def main() -> int:
    return run_switch_rows(*common.run_standard_checks("omnibiote", parity, throughput, train), switch_case)


if __name__ == "__main__":
    sys.exit(main())
