"""geneformer: bf16 SDPA vs fp32, `106m` throughput at 2,048 genes, a CLI training run, FP8 (torchao or TE) vs BF16,
the V2 configs at 4,096, `data.batching` random vs length_grouped vs packed at 2,048 and 4,096, compile and
activation checkpointing.

Run with recipes/geneformer as cwd."""

from __future__ import annotations

import math
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from config import load_config
from gpu_check.common import (
    BF16_TOLERANCE,
    CheckFailed,
    CheckSkipped,
    Context,
    TrainSpec,
    bf16_autocast,
    fwd_bwd_step,
    measure_throughput,
    median_metric,
    parity_result,
    read_losses,
    relative_error,
    run_cli,
    run_standard_checks,
    train_and_resume,
)
from gpu_check.switches import SwitchCase, run_switch_rows
from model import BertForMaskedLM, geneformer_config

V1_VOCAB = 25426  # Geneformer V1 gene vocabulary (the bundled sample has a 767-gene one)
V2_VOCAB = 20275  # the upstream V2 vocabulary (~20k protein-coding genes + specials)
FP8_LOSS_TOLERANCE = 0.05  # relative gap of FP8 from BF16 in the mean of the last 3 logged losses (same batches)


def build(
    config_name: str, layers: int | None, device: torch.device, vocab: int = V1_VOCAB, dropout: float | None = None
) -> BertForMaskedLM:
    """The named config's architecture (optionally fewer layers, another dropout) with a vocabulary of `vocab`."""
    model_cfg = asdict(load_config(config_name).model)
    model_cfg.pop("vocab_size")
    if layers is not None:
        model_cfg["num_hidden_layers"] = layers
    if dropout is not None:
        model_cfg["hidden_dropout_prob"] = model_cfg["attention_probs_dropout_prob"] = dropout
    return BertForMaskedLM(geneformer_config(vocab, **model_cfg)).to(device)


def cell_batch(
    batch: int, length: int, device: torch.device, pad_last: bool = True, vocab: int = V1_VOCAB
) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, vocab, (batch, length))
    mask = torch.ones_like(ids)
    if pad_last and batch > 1:
        ids[-1, length // 2 :] = 0  # <pad>
        mask[-1, length // 2 :] = 0
    chosen = (torch.rand(ids.shape) < 0.15) & mask.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = torch.where(chosen, torch.ones_like(ids), ids)  # <mask> = 1
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def parity(ctx: Context) -> tuple[str, dict]:
    size = ctx.sizes["parity"]
    model = build(size["config"], size["layers"], ctx.device).eval()
    batch = cell_batch(size["batch"], size["length"], ctx.device)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        with bf16_autocast(ctx.device):
            fast = model(batch["input_ids"], batch["attention_mask"]).logits.float()
        ref = model(batch["input_ids"], batch["attention_mask"]).logits.float()
    what = f"bf16 SDPA vs fp32, {size['config']} x {size['layers']} layers, padded {size['batch']}x{size['length']}"
    return parity_result({"bf16": relative_error(fast[valid], ref[valid])}, {"bf16": BF16_TOLERANCE}, what)


def throughput(ctx: Context) -> tuple[str, dict]:
    size = ctx.sizes["throughput"]
    model = build(size["config"], size["layers"], ctx.device).train()
    batch = cell_batch(size["batch"], size["length"], ctx.device, pad_last=False)
    step = fwd_bwd_step(model, lambda: model(**batch, masked_logits_only=True).loss, ctx.device)
    tokens, params = size["batch"] * size["length"], sum(p.numel() for p in model.parameters())
    summary, metrics = measure_throughput(ctx, step, tokens, params)
    return f"{size['config']} at {size['length']}: {summary}", metrics


def train(ctx: Context) -> tuple[str, dict]:
    steps, bf16 = ctx.sizes["train"]["steps"], ctx.sizes["train"]["bf16"]

    def command(run_dir: Path) -> list[str]:
        return [
            *("train.py", "--config-name", "l0_sanity"),
            f"training.max_steps={steps}",
            f"training.log_every_n_steps={max(1, steps // 10)}",
            f"training.save_every={steps // 2}",
            f"training.bf16={str(bf16).lower()}",
            f"training.output_dir={run_dir}",
        ]

    spec = TrainSpec(full=command)
    return train_and_resume(ctx, spec, timeout=ctx.sizes["budget_s"])


def fp8_vs_bf16(ctx: Context, spec: dict) -> tuple[str, dict]:
    """The same CLI run twice on the bundled sample, BF16 and FP8 (backend auto: TE if it imports, else torchao)."""
    if not ctx.is_cuda:
        raise CheckSkipped("FP8 needs a CUDA GPU of compute capability >= 8.9 (CPU dry run)")
    if torch.cuda.get_device_capability() < (8, 9):
        raise CheckSkipped(f"FP8 needs compute capability >= 8.9, this GPU has {torch.cuda.get_device_capability()}")
    results = {}
    for label, extra in (("bf16", []), ("fp8", ["training.use_fp8=true"])):
        run_dir = ctx.out_dir / f"{spec['name'].replace(' ', '_')}_{label}"
        shutil.rmtree(run_dir, ignore_errors=True)
        argv = ["train.py", "--config-name", spec["config"], *spec["overrides"], "training.use_fsdp=false"]
        argv += [f"training.max_steps={spec['steps']}", "training.warmup_steps=10", "training.bf16=true"]
        argv += [f"training.log_every_n_steps={max(1, spec['steps'] // 10)}", f"data.micro_batch_size={spec['batch']}"]
        argv += [f"training.save_every={spec['steps']}", f"training.output_dir={run_dir}", *extra]
        run_cli(argv, ctx.out_dir / f"{run_dir.name}.log", timeout=ctx.sizes["budget_s"])
        tail = [loss for _, loss in read_losses(run_dir)][-3:]  # the last 3 logged losses: one batch is noisy
        results[label] = {"loss": sum(tail) / len(tail), "tokens_per_s": median_metric(run_dir, "tokens_per_s")}
    bf16, fp8 = results["bf16"], results["fp8"]
    speedup = fp8["tokens_per_s"] / bf16["tokens_per_s"]
    gap = abs(fp8["loss"] - bf16["loss"]) / abs(bf16["loss"])
    summary = (
        f"{spec['steps']} steps: loss fp8 {fp8['loss']:.3f} vs bf16 {bf16['loss']:.3f}; "
        f"{fp8['tokens_per_s']:,.0f} vs {bf16['tokens_per_s']:,.0f} tok/s (x{speedup:.2f})"
    )
    metrics = {**{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()}, "speedup": speedup, "gap": gap}
    if not (math.isfinite(fp8["loss"]) and gap <= FP8_LOSS_TOLERANCE):
        raise CheckFailed(f"{summary}: final losses differ by {gap:.1%} > {FP8_LOSS_TOLERANCE:.0%}")
    return summary, metrics


def v2_throughput(ctx: Context, config_name: str) -> tuple[str, dict]:
    """A V2 config (<cls> + 4,094 genes + <eos>) at its full 4,096 positions with the upstream V2 vocabulary."""
    if not (Path("configs") / f"{config_name}.yaml").is_file():
        raise CheckSkipped(f"configs/{config_name}.yaml is not in this checkout")
    size = ctx.sizes["v2"]
    model = build(config_name, size["layers"], ctx.device, vocab=V2_VOCAB).train()
    length = min(size["length"], model.config.max_position_embeddings)
    batch = cell_batch(size["batch"], length, ctx.device, pad_last=False, vocab=V2_VOCAB)
    layers = f" x {size['layers']} layers" if size["layers"] else ""
    if not ctx.is_cuda:  # the dry run builds the config and trains one step; its tokens/s would say nothing
        loss = model(**batch, masked_logits_only=True).loss
        loss.backward()
        if not math.isfinite(float(loss)):
            raise CheckFailed(f"{config_name}: loss {float(loss)}")
        return f"{config_name}{layers} at {length}: one step, loss {float(loss):.3f}; throughput on CUDA only", {}
    step = fwd_bwd_step(model, lambda: model(**batch, masked_logits_only=True).loss, ctx.device)
    summary, metrics = measure_throughput(ctx, step, batch["input_ids"].numel(), model.num_parameters())
    return f"{config_name}{layers} at {length}: {summary}", metrics


def switch_case(ctx: Context) -> SwitchCase:
    """The throughput model (dropout off) and batch; switches: `configure_layers`, what `training.compile` /
    `training.activation_checkpointing` call."""
    from model import configure_layers

    size = ctx.sizes["throughput"]
    batch = cell_batch(size["batch"], size["length"], ctx.device, pad_last=False)

    def apply(model: BertForMaskedLM, compile: bool, activation_checkpointing: bool) -> None:
        configure_layers(model, compile=compile, activation_checkpointing=activation_checkpointing)

    return SwitchCase(
        build=lambda: build(size["config"], size["layers"], ctx.device, dropout=0.0).train(),
        loss=lambda model: model(**batch, masked_logits_only=True).loss,
        apply=apply,
        tokens=batch["input_ids"].numel(),
        what=f"{size['config']} at {size['length']}",
    )


def batching(ctx: Context, spec: dict) -> tuple[str, dict]:
    config_file = Path("configs") / f"{spec['config']}.yaml"
    if not config_file.is_file():
        raise CheckSkipped(f"{config_file} is not in this checkout")
    from gpu_check.geneformer_batching import batching_row

    vocab = V2_VOCAB if spec["config"].startswith("v2") else V1_VOCAB
    return batching_row(ctx, spec, lambda name, layers, device, v: build(name, layers, device, v), vocab)


def main() -> int:
    ctx, recorder = run_standard_checks("geneformer", parity, throughput, train)
    for spec in ctx.sizes["fp8"]:
        recorder.run(spec["name"], lambda spec=spec: fp8_vs_bf16(ctx, spec))
    for config_name in ctx.sizes["v2"]["configs"]:
        recorder.run(config_name, lambda name=config_name: v2_throughput(ctx, name))
    for spec in ctx.sizes["batching"]:
        recorder.run(spec["name"], lambda spec=spec: batching(ctx, spec))
    return run_switch_rows(ctx, recorder, switch_case)


if __name__ == "__main__":
    sys.exit(main())
