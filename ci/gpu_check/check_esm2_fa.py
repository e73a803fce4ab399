"""esm2_fa: every `model.attention` backend of transformers' EsmForMaskedLM (flash_attention_2, sdpa, flex_attention,
eager; faesm where it imports) against eager at the same weights, ESM-2 650M throughput per backend, a training run,
compile and activation checkpointing.

Run with recipes/esm2_fa as cwd (its modules live in src/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_check.common import (
    BF16_TOLERANCE,
    CheckFailed,
    CheckSkipped,
    Context,
    Recorder,
    TrainSpec,
    bf16_autocast,
    count_flops,
    fwd_bwd_step,
    measure_throughput,
    parity_result,
    parse_context,
    relative_error,
    run_cli,
    run_standard_checks,
    train_and_resume,
)
from gpu_check.sizes import FAESM_SITE_VARIABLE
from gpu_check.switches import SwitchCase, run_switch_rows

sys.path.insert(0, str(Path.cwd() / "src"))
FAESM_ROW_FLAG = "--faesm-row"
if FAESM_ROW_FLAG in sys.argv:
    # transformers 4.53 imports `kernels` wherever one is installed, and kernels 0.19 needs huggingface-hub >= 1,
    # which the faesm site replaces with 0.36: hide it (None in sys.modules reads as "not installed").
    sys.modules.setdefault("kernels", None)

from model import CLS_ID, EOS_ID, MASK_ID, PAD_ID, build_model, esm2_config, resolve_attention  # noqa: E402

TINY_CONFIG = "src/config_tiny_cpu.yaml"
BACKENDS = ("flash_attention_2", "sdpa", "flex_attention", "eager", "faesm")
FP32_BACKEND_TOLERANCE = 1e-4  # fp32 logits of a backend vs eager: only the summation order differs


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


def mlm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy over the masked positions from the logits (faesm's forward takes no labels)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


def backend_parity(ctx: Context, attention: str, size: dict) -> tuple[dict, dict]:
    """Logit errors of `attention` against eager fp32 at the same weights on a padded batch (valid positions)."""
    reference = build_model(esm2_config(size["model"]), "eager").to(ctx.device).eval()
    fast = build_model(esm2_config(size["model"]), attention).to(ctx.device).eval()
    fast.load_state_dict(reference.state_dict(), strict=False)  # faesm rebuilds its rotary buffers itself
    batch = protein_batch(size["batch"], size["length"], ctx.device)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    valid = batch["attention_mask"].bool()
    errors, limits = {}, {}
    with torch.no_grad():
        ref = reference(**inputs)["logits"].float()
        if attention != "flash_attention_2":  # flash-attn computes in fp16/bf16 only
            errors["fp32"] = relative_error(fast(**inputs)["logits"].float()[valid], ref[valid])
            limits["fp32"] = FP32_BACKEND_TOLERANCE
        if ctx.is_cuda:
            with bf16_autocast(ctx.device):
                errors["bf16"] = relative_error(fast(**inputs)["logits"].float()[valid], ref[valid])
            limits["bf16"] = BF16_TOLERANCE
    return errors, limits


def parity(ctx: Context) -> tuple[str, dict]:
    """The backend `model.attention: auto` picks here, against eager."""
    size = ctx.sizes["parity"]
    attention = resolve_attention("auto")
    errors, limits = backend_parity(ctx, attention, size)
    return parity_result(errors, limits, f"auto={attention} vs eager logits, {size['model']}, padded batch")


def throughput(ctx: Context) -> tuple[str, dict]:
    size = ctx.sizes["throughput"]
    attention = resolve_attention("auto")
    model = build_model(esm2_config(size["model"]), attention).to(ctx.device).train()
    batch = protein_batch(size["batch"], size["length"], ctx.device, pad_last=False)
    step = fwd_bwd_step(model, lambda: mlm_loss(model, batch), ctx.device)
    summary, metrics = measure_throughput(
        ctx, step, size["batch"] * size["length"], sum(p.numel() for p in model.parameters())
    )
    return f"{size['model']} attention={attention}: {summary}", {**metrics, "attention": attention}


def backend_row(ctx: Context, attention: str, eager_flops: dict) -> tuple[str, dict]:
    """One `model.attention` backend: parity against eager, then forward + backward throughput with the FLOPs of
    eager (the same math; FlopCounterMode does not see inside every fused kernel)."""
    from model import faesm_available, flash_attn_available

    if attention == "flash_attention_2" and not (ctx.is_cuda and flash_attn_available()):
        raise CheckSkipped("flash-attn is not installed (a CUDA source build, too big to carry)")
    if attention == "flex_attention" and not ctx.is_cuda:
        raise CheckSkipped(
            "transformers compiles flex_attention with inductor: ~1 min on CPU; esm2_fa's tests check it"
        )
    if attention == "faesm" and not faesm_available():
        raise CheckSkipped("faesm 0.1.1 imports only with transformers <= 4.53: no faesm site here (CI: .venv-faesm)")
    size = ctx.sizes["parity"]
    errors, limits = backend_parity(ctx, attention, size)
    summary, metrics = parity_result(errors, limits, f"vs eager, {size['model']}, padded")
    if not ctx.is_cuda:  # tokens/s of the tiny model would say nothing
        return f"{summary}; throughput on CUDA only", metrics
    size = ctx.sizes["throughput"]
    model = build_model(esm2_config(size["model"]), attention).to(ctx.device).train()
    batch = protein_batch(size["batch"], size["length"], ctx.device, pad_last=False)
    step = fwd_bwd_step(model, lambda: mlm_loss(model, batch), ctx.device)
    if "flops" not in eager_flops:
        eager = build_model(esm2_config(size["model"]), "eager").to(ctx.device).train()
        eager_flops["flops"] = count_flops(fwd_bwd_step(eager, lambda: mlm_loss(eager, batch), ctx.device))
        del eager
    params = sum(p.numel() for p in model.parameters())
    rate, rate_metrics = measure_throughput(ctx, step, batch["input_ids"].numel(), params, eager_flops["flops"])
    return f"{summary}; {size['model']}: {rate}", {**metrics, **rate_metrics}


def switch_case(ctx: Context) -> SwitchCase:
    """The throughput model (dropout off) and batch; switches: `model.apply_speed_switches`, what
    `training.compile` (scope blocks) and `training.activation_checkpointing` call."""
    try:
        from model import apply_speed_switches
    except ImportError as error:
        raise CheckSkipped(f"esm2_fa has no training.compile switch here ({error})") from None
    size = ctx.sizes["throughput"]
    attention = resolve_attention("auto")
    batch = protein_batch(size["batch"], size["length"], ctx.device, pad_last=False)
    config = esm2_config(size["model"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    def apply(model: torch.nn.Module, compile: bool, activation_checkpointing: bool) -> None:
        apply_speed_switches(model, activation_checkpointing, "blocks" if compile else None)

    return SwitchCase(
        build=lambda: build_model(config, attention).to(ctx.device).train(),
        loss=lambda model: mlm_loss(model, batch),
        apply=apply,
        tokens=batch["input_ids"].numel(),
        what=f"{size['model']} attention={attention}",
    )


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
        f"training.save_every={half}",
        f"training.eval_steps={half}",
        f"training.logging_steps={max(1, steps // 10)}",
        "training.early_stopping.enabled=false",
    ] + (["training.mixed_precision=bf16"] if bf16 else [])  # the tiny config's "no" (YAML would read no as false)

    def command(run_dir: Path) -> list[str]:
        argv = ["src/train.py", "--config", TINY_CONFIG, "--train_dir", str(shards / "train")]
        argv += ["--val_dir", str(shards / "val"), "--output_dir", str(run_dir)]
        return argv + overrides  # --resume auto is the default

    spec = TrainSpec(full=command)
    return train_and_resume(ctx, spec, timeout=ctx.sizes["budget_s"])


def faesm_row(ctx: Context) -> tuple[str, dict]:
    """The faesm backend: here when faesm imports, else in a child process with the faesm site (transformers 4.53)
    first on PYTHONPATH, which runs only this row (FAESM_ROW_FLAG) and leaves it in its own rows.json."""
    from model import faesm_available

    site = os.environ.get(FAESM_SITE_VARIABLE)
    if faesm_available() or not site:
        return backend_row(ctx, "faesm", {})
    out = ctx.out_dir / "faesm"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "gpu_check.check_esm2_fa", FAESM_ROW_FLAG, "--device", ctx.device.type]
    command += ["--out", str(out), "--peak-tflops", str(ctx.peak_tflops)]
    with open(ctx.out_dir / "faesm_row.log", "w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    rows = json.loads((out / "rows.json").read_text()) if (out / "rows.json").is_file() else []
    if not rows:
        lines = (ctx.out_dir / "faesm_row.log").read_text(errors="replace").strip().splitlines()
        raise CheckFailed(f"the faesm row's process wrote no row: {lines[-1] if lines else 'no output'}")
    row = rows[0]
    summary = f"{row['summary']} (transformers {row['metrics'].get('transformers', '?')} from {site})"
    if row["status"] == "SKIP":
        raise CheckSkipped(summary)
    if row["status"] == "FAIL":
        raise CheckFailed(summary)
    return summary, row["metrics"]


def main() -> int:
    if FAESM_ROW_FLAG in sys.argv:  # the child of faesm_row, in the faesm site
        sys.argv.remove(FAESM_ROW_FLAG)
        ctx = parse_context("esm2_fa")
        import transformers

        def row() -> tuple[str, dict]:
            summary, metrics = backend_row(ctx, "faesm", {})
            return summary, {**metrics, "transformers": transformers.__version__}

        Recorder("esm2_fa", ctx.out_dir).run("attention faesm", row)
        return 0
    ctx, recorder = run_standard_checks("esm2_fa", parity, throughput, train)
    eager_flops: dict = {}
    for attention in BACKENDS[:-1]:
        recorder.run(f"attention {attention}", lambda a=attention: backend_row(ctx, a, eager_flops))
    run_switch_rows(ctx, recorder, switch_case)
    recorder.run("attention faesm", lambda: faesm_row(ctx))  # last: a process of its own
    return 0


if __name__ == "__main__":
    sys.exit(main())
