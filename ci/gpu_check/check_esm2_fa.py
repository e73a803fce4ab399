"""esm2_fa: faesm SDPA (flash/efficient kernels on CUDA) vs transformers eager, ESM-2 650M throughput, a Trainer run.

Run with recipes/esm2_fa as cwd (its modules live in src/)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gpu_check.common import (
    BF16_TOLERANCE,
    Context,
    TrainSpec,
    bf16_autocast,
    fwd_bwd_step,
    measure_throughput,
    parity_result,
    relative_error,
    run_cli,
    run_standard_checks,
    train_and_resume,
)

sys.path.insert(0, str(Path.cwd() / "src"))

from model import CLS_ID, EOS_ID, MASK_ID, PAD_ID, build_model, esm2_config, resolve_attention  # noqa: E402
from train import masked_lm_loss  # noqa: E402

TINY_CONFIG = "src/config_tiny_cpu.yaml"


def protein_batch(batch: int, length: int, device: torch.device, pad_last: bool = True) -> dict[str, torch.Tensor]:
    """<cls> random residues <eos>, the last row half padding; 15% of residues masked with labels."""
    ids = torch.randint(4, 24, (batch, length))
    ids[:, 0] = CLS_ID
    ids[:, -1] = EOS_ID
    mask = torch.ones_like(ids)
    if pad_last and batch > 1:
        half = length // 2
        ids[-1, half] = EOS_ID
        ids[-1, half + 1 :] = PAD_ID
        mask[-1, half + 1 :] = 0
    chosen = (torch.rand(ids.shape) < 0.15) & (ids > EOS_ID)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids = torch.where(chosen, torch.full_like(ids, MASK_ID), ids)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def parity(ctx: Context) -> tuple[str, dict]:
    size = ctx.sizes["parity"]
    config = esm2_config(size["model"])
    fast = build_model(config, "sdpa").to(ctx.device).eval()  # faesm; SDPA picks flash/efficient on CUDA
    reference = build_model(esm2_config(size["model"]), "eager").to(ctx.device).eval()
    reference.load_state_dict(fast.state_dict())
    batch = protein_batch(size["batch"], size["length"], ctx.device)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        with bf16_autocast(ctx.device):
            out_bf16 = fast(**inputs)["logits"].float()
        out_fp32 = fast(**inputs)["logits"].float()
        ref = reference(**inputs)["logits"].float()
    errors = {
        "bf16 sdpa": relative_error(out_bf16[valid], ref[valid]),
        "fp32 sdpa": relative_error(out_fp32[valid], ref[valid]),
    }
    limits = {"bf16 sdpa": BF16_TOLERANCE, "fp32 sdpa": 1e-3}
    return parity_result(errors, limits, f"faesm vs eager logits, {size['model']}, padded batch")


def throughput(ctx: Context) -> tuple[str, dict]:
    size = ctx.sizes["throughput"]
    attention = resolve_attention("auto")
    model = build_model(esm2_config(size["model"]), attention).to(ctx.device).train()
    batch = protein_batch(size["batch"], size["length"], ctx.device, pad_last=False)
    step = fwd_bwd_step(model, lambda: masked_lm_loss(model, batch), ctx.device)
    summary, metrics = measure_throughput(
        ctx, step, size["batch"] * size["length"], sum(p.numel() for p in model.parameters())
    )
    return f"{size['model']} attention={attention}: {summary}", {**metrics, "attention": attention}


def preprocess(ctx: Context) -> Path:
    shards = ctx.out_dir / "shards"
    for split in ("train", "val"):
        if not (shards / split).is_dir():
            argv = ["src/data_processing.py", "--config", TINY_CONFIG, "--input_fasta", f"sample_data/{split}.fasta"]
            argv += ["--output_dir", str(shards / split), "--max_aa_length", "510", "--chunk_size", "2000"]
            run_cli(argv + ["--shard_size", "500"], ctx.out_dir / f"preprocess_{split}.log", 120)
    return shards


def train(ctx: Context) -> tuple[str, dict]:
    steps, bf16 = ctx.sizes["train"]["steps"], ctx.sizes["train"]["bf16"]
    shards = preprocess(ctx)
    half = steps // 2
    overrides = [
        f"training.max_steps={steps}",
        f"training.schedule_steps={steps}",
        f"training.warmup_steps={max(1, steps // 5)}",
        f"training.save_steps={half}",
        f"training.eval_steps={half}",
        f"training.logging_steps={max(1, steps // 10)}",
        "training.early_stopping.enabled=false",
    ] + (["training.mixed_precision=bf16"] if bf16 else [])  # the tiny config's "no" (YAML would read no as false)

    def command(run_dir: Path) -> list[str]:
        argv = ["src/train.py", "--config", TINY_CONFIG, "--train_dir", str(shards / "train")]
        argv += ["--val_dir", str(shards / "val"), "--output_dir", str(run_dir)]
        return argv + overrides  # --resume_from_checkpoint auto is the default

    spec = TrainSpec(full=command)
    return train_and_resume(ctx, spec, timeout=ctx.sizes["budget_s"])


def main() -> int:
    run_standard_checks("esm2_fa", parity, throughput, train)
    return 0


if __name__ == "__main__":
    sys.exit(main())
