"""gtdb_mamba: mambapy on CUDA vs its CPU fp32 path, 8 x 1536 throughput on 512-token fragments, a CLI training run.

Run with recipes/gtdb_mamba as cwd. The image has no mamba-ssm, so `backend=auto` is mambapy there too."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_check import common
from gpu_check.switches import SwitchCase, run_switch_rows
from model import CurricularFace, EmbedderConfig, GenomeFragmentEmbedder, mamba_ssm_available

N_CLASSES = 1000  # genomes in the CurricularFace head of the throughput model


def embedder(size: dict) -> GenomeFragmentEmbedder:
    config = EmbedderConfig(d_model=size["d_model"], n_layers=size["n_layers"], backend="auto")
    return GenomeFragmentEmbedder(config)


def fragments(size: dict, pad_token: int, pad_last: bool = True) -> torch.Tensor:
    tokens = torch.randint(0, 1024, (size["batch"], size["length"]))
    if pad_last and size["batch"] > 1:
        tokens[-1, size["length"] // 2 :] = pad_token  # exercises the per-sequence reversal of padded rows
    return tokens


def parity(ctx: common.Context) -> tuple[str, dict]:
    size = ctx.sizes["parity"]
    reference = embedder(size).eval()  # CPU, fp32: the path the recipe's CPU tests check
    tokens = fragments(size, reference.config.pad_token)
    fast = copy.deepcopy(reference).to(ctx.device)
    with torch.no_grad():
        ref = reference(tokens)
        fp32 = fast(tokens.to(ctx.device))
        with common.bf16_autocast(ctx.device):
            bf16 = fast(tokens.to(ctx.device))
    errors = {
        f"{ctx.device.type} fp32": float((fp32.double().cpu() - ref.double()).norm() / ref.double().norm()),
        f"{ctx.device.type} bf16": float((bf16.double().cpu() - ref.double()).norm() / ref.double().norm()),
    }
    limits = dict(zip(errors, (common.FP32_TOLERANCE, common.BF16_TOLERANCE)))
    backend = "mamba_ssm" if mamba_ssm_available() else "mambapy"
    what = f"{backend} on {ctx.device.type} vs CPU fp32, pooled embeddings, {size['d_model']} x {size['n_layers']}"
    return common.parity_result(errors, limits, what)


def throughput(ctx: common.Context) -> tuple[str, dict]:
    size = ctx.sizes["throughput"]
    model = embedder(size).to(ctx.device).train()
    head = CurricularFace(size["d_model"], N_CLASSES, scale=30.0).to(ctx.device)
    tokens = fragments(size, model.config.pad_token, pad_last=False).to(ctx.device)
    labels = torch.randint(0, N_CLASSES, (size["batch"],), device=ctx.device)
    both = torch.nn.ModuleList([model, head])
    step = common.fwd_bwd_step(both, lambda: F.cross_entropy(head(model(tokens), labels), labels), ctx.device)
    params = sum(p.numel() for p in both.parameters())
    summary, metrics = common.measure_throughput(ctx, step, size["batch"] * size["length"], params)
    backend = "mamba_ssm" if mamba_ssm_available() else "mambapy"
    return f"{size['d_model']} x {size['n_layers']} {backend}, {size['length']} tokens: {summary}", metrics


def train(ctx: common.Context) -> tuple[str, dict]:
    steps = ctx.sizes["train"]["steps"]
    common.run_cli(["scripts/build_sample.py", "--out", "fixture"], ctx.out_dir / "build_sample.log", 120)

    def command(output_dir: Path) -> list[str]:
        return [
            *("train.py", "--config-name", "sample"),
            f"output_dir={output_dir}",
            f"train.max_steps={steps}",
            f"train.steps_per_epoch={steps // 2}",
            f"train.save_every={steps // 2}",
            f"train.log_every={max(1, steps // 10)}",
            f"train.warmup_steps={max(1, steps // 10)}",
            "val.at_start=false",
            *ctx.sizes["train"]["overrides"],
        ]

    spec = common.TrainSpec(full=command)
    return common.train_and_resume(ctx, spec, timeout=ctx.sizes["budget_s"])


def switch_case(ctx: common.Context) -> SwitchCase:
    """The throughput embedder + CurricularFace head; switches: `set_speed_switches`, what `train.compile` /
    `train.activation_checkpointing` call. The embedder has no dropout."""
    from model import set_speed_switches

    size = ctx.sizes["throughput"]
    tokens = fragments(size, EmbedderConfig().pad_token, pad_last=False).to(ctx.device)
    labels = torch.randint(0, N_CLASSES, (size["batch"],), device=ctx.device)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        head = CurricularFace(size["d_model"], N_CLASSES, scale=30.0)
        return torch.nn.ModuleDict({"embedder": embedder(size), "head": head}).to(ctx.device).train()

    def loss(both: torch.nn.Module) -> torch.Tensor:
        return F.cross_entropy(both["head"](both["embedder"](tokens), labels), labels)

    def apply(both: torch.nn.Module, compile: bool, activation_checkpointing: bool) -> None:
        set_speed_switches(both["embedder"], compile, activation_checkpointing)

    backend = "mamba_ssm" if mamba_ssm_available() else "mambapy"
    what = f"{size['d_model']} x {size['n_layers']} {backend}, {size['length']} tokens"
    return SwitchCase(build=build, loss=loss, apply=apply, tokens=tokens.numel(), what=what)


def main() -> int:
    return run_switch_rows(*common.run_standard_checks("gtdb_mamba", parity, throughput, train), switch_case)


if __name__ == "__main__":
    sys.exit(main())
