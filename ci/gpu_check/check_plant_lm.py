"""plant_lm: blocked local attention vs its dense reference and the whole model (bucket memory filled) in bf16 vs fp32,
the default model's throughput, a CLI run on the bundled Arabidopsis sample.

Run with recipes/plant_lm as cwd."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gpu_check import common
from gpu_check.switches import SwitchCase, run_switch_rows
from model import VOCAB_SIZE, PlantLM, blocked_local_attention, dense_local_attention

N_SPECIES = 3


def build(size: dict, device: torch.device, dropout: float) -> PlantLM:
    return PlantLM(
        N_SPECIES,
        d_model=size["d_model"],
        n_heads=size["n_heads"],
        n_layers=size["n_layers"],
        dropout=dropout,
        local_attn_window=size["window"],
        max_positions=size["length"],
    ).to(device)


def windows(size: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB_SIZE, (size["batch"], size["length"] + 1), device=device)
    species = torch.randint(0, N_SPECIES, (size["batch"],), device=device)
    return ids[:, :-1], ids[:, 1:], species


def parity(ctx: common.Context) -> tuple[str, dict]:
    size = ctx.sizes["parity"]
    batch, heads, length = size["batch"], size["n_heads"], size["length"]
    q, k, v = (torch.randn(batch, heads, length, size["d_model"] // heads, device=ctx.device) for _ in range(3))
    with torch.no_grad():
        ref_local = dense_local_attention(q, k, v, size["window"])
        with common.bf16_autocast(ctx.device):
            bf16_local = blocked_local_attention(q, k, v, size["window"]).float()
        fp32_local = blocked_local_attention(q, k, v, size["window"])
        model = build(size, ctx.device, dropout=0.0).eval()
        ids, _, species = windows(size, ctx.device)
        model(ids, species, memory_write_len=length // 2)  # fill the bucket memory, as training does
        model.memory.commit(global_context=20_000, normalize_every=1)
        ref_model = model(ids, species)["logits"].float()
        with common.bf16_autocast(ctx.device):
            bf16_model = model(ids, species)["logits"].float()
    errors = {
        "fp32 blocked local": common.relative_error(fp32_local, ref_local),
        "bf16 blocked local": common.relative_error(bf16_local, ref_local),
        "bf16 model (local + bucket)": common.relative_error(bf16_model, ref_model),
    }
    limits = dict(zip(errors, (1e-5, common.BF16_TOLERANCE, common.BF16_TOLERANCE)))
    nonempty = int((model.memory.counts > 0).sum())
    what = f"vs dense band mask / fp32 model, seq {length}, window {size['window']}, {nonempty} memory buckets"
    return common.parity_result(errors, limits, what)


def throughput(ctx: common.Context) -> tuple[str, dict]:
    size = ctx.sizes["throughput"]
    model = build(size, ctx.device, dropout=0.1).train()
    ids, targets, species = windows(size, ctx.device)
    step = common.fwd_bwd_step(model, lambda: model(ids, species, targets)["loss"], ctx.device)
    params = sum(p.numel() for p in model.parameters())
    summary, metrics = common.measure_throughput(ctx, step, ids.numel(), params)
    return (
        f"d{size['d_model']} x {size['n_layers']}, context {size['length']}, batch {size['batch']}: {summary}",
        metrics,
    )


def train(ctx: common.Context) -> tuple[str, dict]:
    per_epoch = ctx.sizes["train"]["steps_per_epoch"]

    def command(run_dir: Path) -> list[str]:  # the sample's settings; --resume auto is the default
        argv = ["train.py", "--config", "configs/sample.yaml", "--output_dir", str(run_dir)]
        return argv + ["--warmup_steps", str(max(1, per_epoch // 3)), "--steps_per_epoch", str(per_epoch)]

    spec = common.TrainSpec(full=command)
    return common.train_and_resume(ctx, spec, timeout=ctx.sizes["budget_s"])


def switch_case(ctx: common.Context) -> SwitchCase:
    """The throughput model (dropout off) and batch; switches: `compile_blocks()` and `activation_checkpointing`,
    what `--compile` / `--activation_checkpointing` set."""
    size = ctx.sizes["throughput"]
    ids, targets, species = windows(size, ctx.device)

    def apply(model: PlantLM, compile: bool, activation_checkpointing: bool) -> None:
        if compile:
            model.compile_blocks()
        model.activation_checkpointing = activation_checkpointing

    return SwitchCase(
        build=lambda: build(size, ctx.device, dropout=0.0).train(),
        loss=lambda model: model(ids, species, targets)["loss"],
        apply=apply,
        tokens=ids.numel(),
        what=f"d{size['d_model']} x {size['n_layers']}, context {size['length']}",
    )


def main() -> int:
    return run_switch_rows(*common.run_standard_checks("plant_lm", parity, throughput, train), switch_case)


if __name__ == "__main__":
    sys.exit(main())
