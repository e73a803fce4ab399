"""The two speed switches on CPU, each against the same step without it, in one run (called by bench.py).

    python bench_switches.py --model esm2_t6_8M --rows 4 --length 1024

- torch.compile (training.compile, per block): real tokens/s of the recipe's training step, compiled vs not,
  interleaved on the same batches after a warm-up that includes the compilation.
- activation checkpointing (training.activation_checkpointing): peak memory of one training step and tokens/s,
  at the same batch (rows x length tokens). Peak memory is measured in a fresh subprocess per variant: model and
  AdamW state are allocated first (a step on zero gradients), then the resident set size is read, one real training
  step runs, and the step's peak is `ru_maxrss` (the kernel's high-water mark of the process) minus that RSS.
  Tokens/s are interleaved in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from biorecipes_shared import interleaved_medians

RECIPE_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(RECIPE_DIR / "src"))

from data import mask_tokens  # noqa: E402
from model import MaskedLMLoss, apply_speed_switches, build_model, esm2_config  # noqa: E402


def batch_of(rows: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """rows x length tokens of random residues between <cls> and <eos>, MLM-masked (no padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 24, (rows, length), generator=generator)
    ids[:, 0], ids[:, -1] = 0, 2
    return mask_tokens({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0.2, generator)


def training_step(model_name: str, activation_checkpointing: bool = False, compile_scope: str | None = None):
    """(step function over a list of batches, model): the recipe's loss, backward and AdamW step."""
    torch.manual_seed(0)
    model = build_model(esm2_config(model_name), "sdpa")
    apply_speed_switches(model, activation_checkpointing, compile_scope)
    wrapped = MaskedLMLoss(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batches):
        for batch in batches:
            wrapped(**batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, model, optimizer


def memory_probe(model_name: str, rows: int, length: int, activation_checkpointing: bool) -> dict[str, float]:
    """In this (fresh) process: RSS after model + optimizer state, and the peak of one training step, in MiB."""
    step, model, optimizer = training_step(model_name, activation_checkpointing)
    for param in model.parameters():  # allocate AdamW's state without activations
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    batch = batch_of(rows, length)
    before = psutil.Process().memory_info().rss / 2**20
    step([batch])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB
    return {"rss_before_mib": before, "peak_mib": peak, "step_peak_mib": peak - before}


def measure_memory(model_name: str, rows: int, length: int, activation_checkpointing: bool) -> dict[str, float]:
    """memory_probe in a fresh python process (ru_maxrss is a lifetime high-water mark)."""
    command = [sys.executable, __file__, "--probe", "--model", model_name, "--rows", str(rows), "--length", str(length)]
    command += ["--ac"] if activation_checkpointing else []
    # A fixed mmap threshold: glibc otherwise raises it after large frees and serves later tensors from a heap it does
    # not give back, so the high-water mark measured allocator history (step peak 1,064-1,411 MiB over identical runs)
    # instead of the tensors alive at once (820 MiB every run).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_compile(model_name: str, batches, repeats: int) -> dict[str, float]:
    """Real tokens/s of the training step, eager vs compiled per block (compilation in the warm-up)."""
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    eager, _, _ = training_step(model_name)
    compiled, _, _ = training_step(model_name, compile_scope="blocks")
    times = interleaved_medians({"eager": lambda: eager(batches), "compiled": lambda: compiled(batches)}, repeats)
    return {name: tokens / seconds for name, seconds in times.items()}


def bench_activation_checkpointing(model_name: str, rows: int, length: int, repeats: int) -> dict[str, dict]:
    """{variant: tokens/s and the memory probe's figures} without and with activation checkpointing."""
    batch = batch_of(rows, length)
    plain, _, _ = training_step(model_name)
    checkpointed, _, _ = training_step(model_name, activation_checkpointing=True)
    times = interleaved_medians({"off": lambda: plain([batch]), "on": lambda: checkpointed([batch])}, repeats)
    results = {}
    for name, flag in (("off", False), ("on", True)):
        results[name] = {"tokens_per_s": rows * length / times[name], **measure_memory(model_name, rows, length, flag)}
    return results


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="esm2_t6_8M")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ac", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(memory_probe(args.model, args.rows, args.length, args.ac)))
        return []
    ac = bench_activation_checkpointing(args.model, args.rows, args.length, args.repeats)
    off, on = ac["off"], ac["on"]
    compile_batches = [batch_of(2, 256, seed) for seed in range(3)]
    compiled = bench_compile(args.model, compile_batches, args.repeats)
    shape = f"{args.model}, {args.rows} x {args.length} tokens"
    rows = [
        (f"activation checkpointing, {shape}: step peak MiB (off / on)", f"{off['step_peak_mib']:,.0f} / {on['step_peak_mib']:,.0f}"),
        (f"activation checkpointing, {shape}: process peak MiB (off / on)", f"{off['peak_mib']:,.0f} / {on['peak_mib']:,.0f}"),
        (f"activation checkpointing, {shape}: tokens/s (off / on)", f"{off['tokens_per_s']:,.0f} / {on['tokens_per_s']:,.0f}"),
        (f"torch.compile per block, {args.model}, 3 x 2 x 256 tokens: tokens/s (eager / compiled)",
         f"{compiled['eager']:,.0f} / {compiled['compiled']:,.0f}"),
    ]  # fmt: skip
    for name, value in rows:
        print(f"{name}  {value}")
    print(
        f"headline: activation checkpointing step peak {on['step_peak_mib'] / off['step_peak_mib']:.2f}x "
        f"(process peak {on['peak_mib'] / off['peak_mib']:.2f}x; goal <= 0.7x) at "
        f"{on['tokens_per_s'] / off['tokens_per_s']:.2f}x the tokens/s"
    )
    print(f"headline: torch.compile per block {compiled['compiled'] / compiled['eager']:.2f}x tokens/s on CPU")
    return rows


if __name__ == "__main__":
    main()
