"""Benchmarks of the plant_lm recipe on CPU (`python bench.py`, about 3-5 minutes on 2 cores).

1. 6-mer tokenisation: vectorised numpy `tokenize` vs a pure-Python loop, MB/s on the bundled real sequences.
2. Per-token cost of a training step (forward + backward + bucket memory update) with a global context of
   2k vs 200k tokens; for reference, a naive memory update that re-averages a history buffer.
3. Local attention at 4k tokens: blocked sliding window vs SDPA with a dense banded mask (time, peak memory).
3b. The switches: torch.compile per block on/off (real tokens/s), activation checkpointing on/off (peak RSS of a
   step in a fresh process per variant, and tokens/s at the same batch).
4. Scale (`bench_scale.py`, also runnable alone): one-line vs wrapped chromosome, peak RSS at 1x / 10x, streaming
   throughput at 1 and 2 processes against the gunzip ceiling, extrapolation to maize.
Every comparison is interleaved (A, B, A, B, ...) after one warm-up, and reports the median of 7 repeats.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import bench_scale
from biorecipes_shared import interleaved_medians
from data import tokenize
from model import VOCAB_SIZE, PlantLM, blocked_local_attention, dense_local_attention

HERE = Path(__file__).resolve().parent
REPEATS = 7
NAIVE_UPDATES_PER_CALL = 5
BASE = {"A": 0, "C": 1, "G": 2, "T": 3}


def python_6mers(seq: str) -> list[list[int]]:
    """Baseline: the obvious pure-Python loop (split at non-ACGT, non-overlapping 6-mers)."""
    segments, current, kmer = [], [], []
    for base in seq:
        code = BASE.get(base.upper())
        if code is None:
            if current:
                segments.append(current)
            current, kmer = [], []
            continue
        kmer.append(code)
        if len(kmer) == 6:
            current.append(kmer[0] * 1024 + kmer[1] * 256 + kmer[2] * 64 + kmer[3] * 16 + kmer[4] * 4 + kmer[5])
            kmer = []
    if current:
        segments.append(current)
    return segments


def sample_sequence() -> str:
    parts = []
    for path in sorted((HERE / "sample_data").glob("*/*.fa.gz")):
        with gzip.open(path, "rt") as handle:
            parts.append("".join(line.strip() for line in handle if not line.startswith(">")))
    return "".join(parts)


def bench_tokenizer() -> float:
    seq = sample_sequence() * 4  # ~3.6 MB: long enough that each timed call lasts well above timer noise
    assert [s.tolist() for s in tokenize(seq)] == python_6mers(seq)  # same answer before timing
    raw = seq.encode()
    med = interleaved_medians({"numpy": lambda: tokenize(raw), "python": lambda: python_6mers(seq)}, REPEATS)
    mb = len(raw) / 1e6
    print(
        f"| tokenise {mb:.2f} MB real DNA | numpy {mb / med['numpy']:.1f} MB/s | "
        f"pure Python {mb / med['python']:.2f} MB/s | {med['python'] / med['numpy']:.0f}x |"
    )
    return med["python"] / med["numpy"]


def naive_update(history_ids: torch.Tensor, history_hidden: torch.Tensor, ids, hidden):
    """Baseline memory update: push the new tokens into a history of `global_context` and re-average it."""
    n = len(ids)
    history_ids[:-n] = history_ids[n:].clone()
    history_hidden[:-n] = history_hidden[n:].clone()
    history_ids[-n:], history_hidden[-n:] = ids, hidden
    sums = torch.zeros(VOCAB_SIZE, hidden.shape[1]).index_add_(0, history_ids, history_hidden)
    return sums / torch.bincount(history_ids, minlength=VOCAB_SIZE).clamp_min(1).unsqueeze(1)


def bench_global_context() -> float:
    torch.manual_seed(0)
    batch, seq, d_model = 16, 64, 128
    model = PlantLM(3, d_model=d_model, n_heads=4, n_layers=2, dropout=0.0, max_positions=seq)
    model.memory.sums.normal_()
    model.memory.counts.fill_(1.0)  # steady state: every bucket written
    ids = torch.randint(0, VOCAB_SIZE, (batch, seq))
    species = torch.randint(0, 3, (batch,))

    def step(global_context: int):
        def run():
            model(ids, species, ids, memory_write_len=seq // 2)["loss"].backward()
            model.memory.commit(global_context, normalize_every=1000)

        return run

    med = interleaved_medians({"2k": step(2_000), "200k": step(200_000)}, REPEATS)
    tokens = batch * seq
    ratio = med["200k"] / med["2k"]
    print(
        f"| train step per token, global context 2k | {med['2k'] / tokens * 1e6:.0f} us | 200k | "
        f"{med['200k'] / tokens * 1e6:.0f} us | {ratio:.2f}x |"
    )
    new_ids, new_hidden = ids[:, : seq // 2].reshape(-1), torch.randn(batch * seq // 2, d_model)
    histories = {g: (torch.randint(0, VOCAB_SIZE, (g,)), torch.randn(g, d_model)) for g in (2_000, 200_000)}

    # Reference for what the design avoids: an update that keeps a history of `global_context` hidden states and
    # re-averages it grows with the context. (Timing our own update alone was dominated by scheduler noise.)
    def naive(global_context):
        def run():
            for _ in range(NAIVE_UPDATES_PER_CALL):
                naive_update(*histories[global_context], new_ids, new_hidden)

        return run

    upd = interleaved_medians({"2k": naive(2_000), "200k": naive(200_000)}, REPEATS)
    print(
        f"| naive history-average memory update, 2k | {upd['2k'] / NAIVE_UPDATES_PER_CALL * 1e3:.2f} ms | 200k | "
        f"{upd['200k'] / NAIVE_UPDATES_PER_CALL * 1e3:.2f} ms | {upd['200k'] / upd['2k']:.0f}x |"
    )
    return ratio


ATTENTION_SHAPE = (1, 8, 4096, 64)  # batch, heads, tokens, head_dim
WINDOW = 32


def attention_inputs():
    torch.manual_seed(0)
    return [torch.randn(*ATTENTION_SHAPE, requires_grad=True) for _ in range(3)]


UPSTREAM_GRAD = torch.randn(*ATTENTION_SHAPE)


def attention_step(kind: str, q, k, v) -> None:
    fn = blocked_local_attention if kind == "blocked" else dense_local_attention
    # A dense upstream gradient, as in training: `.sum().backward()` passes a stride-0 gradient that sent CPU bmm
    # down a path 50x slower on some calls.
    fn(q, k, v, WINDOW).backward(UPSTREAM_GRAD)


def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{key}:\s+(\d+) kB", handle.read()).group(1)) / 1024


def peak_memory_child(kind: str) -> None:
    """Run in a fresh process: print the peak RSS growth (MiB) of one forward+backward of `kind` (Linux only)."""
    attention_step(kind, *attention_inputs())  # warm-up: kernels and allocator pools
    q, k, v = attention_inputs()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the high-water mark VmHWM to the current RSS
    before = _proc_status_mib("VmRSS")
    attention_step(kind, q, k, v)
    print(json.dumps({"peak_mib": _proc_status_mib("VmHWM") - before}))


def bench_local_attention() -> tuple[float, float]:
    q, k, v = attention_inputs()
    blocked_out = blocked_local_attention(q, k, v, WINDOW)
    torch.testing.assert_close(blocked_out, dense_local_attention(q, k, v, WINDOW))
    med = interleaved_medians(
        {name: (lambda name=name: attention_step(name, q, k, v)) for name in ("blocked", "dense")}, REPEATS
    )
    peak = {}
    for name in ("blocked", "dense"):
        out = subprocess.run(
            [sys.executable, __file__, "--peak-memory", name], capture_output=True, text=True, check=True, cwd=HERE
        )
        peak[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    print(
        f"| local attention 4096 tokens fwd+bwd, blocked | {med['blocked'] * 1e3:.0f} ms, {peak['blocked']:.0f} MiB "
        f"| dense mask | {med['dense'] * 1e3:.0f} ms, {peak['dense']:.0f} MiB | "
        f"{med['dense'] / med['blocked']:.1f}x faster, {peak['dense'] / max(peak['blocked'], 1):.0f}x less memory |"
    )
    return med["dense"] / med["blocked"], peak["dense"] / max(peak["blocked"], 1)


# Switches (issue 20): a mid-size model whose step is dominated by the transformer blocks, as in training.
SWITCH_MODEL = dict(d_model=128, n_heads=4, n_layers=4, dropout=0.0, local_attn_window=32, max_positions=64)
SWITCH_BATCH, SWITCH_CONTEXT = 16, 64


def switch_step(compiled: bool = False, checkpointed: bool = False):
    """A training step (fwd + bwd + AdamW + memory commit) of SWITCH_MODEL on fixed windows; returns (step, tokens).

    Every window is whole (no padding), so the real tokens per step are batch x context."""
    torch.manual_seed(0)
    model = PlantLM(3, **SWITCH_MODEL)
    model.activation_checkpointing = checkpointed
    if compiled:
        model.compile_blocks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, VOCAB_SIZE, (SWITCH_BATCH, SWITCH_CONTEXT + 1), generator=torch.Generator().manual_seed(1))
    species = torch.arange(SWITCH_BATCH) % 3
    losses = []

    def step():
        out = model(ids[:, :-1], species, ids[:, 1:], memory_write_len=SWITCH_CONTEXT // 2)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.memory.commit(200_000, 1000)
        losses.append(out["loss"].item())

    return step, SWITCH_BATCH * SWITCH_CONTEXT, losses


def bench_compile() -> tuple[float, float]:
    """Real tokens/s of a training step with each block torch.compile'd vs eager; the compiled first step (the
    compilation) is timed apart, and gives the number of steps after which compiling has paid for itself."""
    eager, tokens, eager_losses = switch_step()
    compiled, _, compiled_losses = switch_step(compiled=True)
    first = {}
    for name, step in (("eager", eager), ("compiled", compiled)):
        start = time.perf_counter()
        step()
        first[name] = time.perf_counter() - start
    med = interleaved_medians({"eager": eager, "compiled": compiled}, repeats=5)
    # Same weights, same data: the two runs must agree before their speeds mean anything.
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=0)
    ratio = med["eager"] / med["compiled"]
    gain = med["eager"] - med["compiled"]
    break_even = (first["compiled"] - first["eager"]) / gain if gain > 0 else math.inf
    print(f"| train step, {tokens} real tokens, compile off | {tokens / med['eager']:.0f} tokens/s | on | "
          f"{tokens / med['compiled']:.0f} tokens/s (first step {first['compiled']:.0f} s vs "
          f"{first['eager']:.1f} s) | {ratio:.2f}x, pays off after {break_even:.0f} steps |")  # fmt: skip
    return ratio, break_even


def switch_memory_child(variant: str) -> None:
    """Run in a fresh process: peak RSS (MiB) of two training steps above the RSS before the first one, with or
    without activation checkpointing. Measured from before the first step because the allocator keeps freed
    activations mapped: a warm-up step would hide the peak the second step reuses."""
    step, _, _ = switch_step(checkpointed=variant == "ac")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the high-water mark VmHWM to the current RSS
    before = _proc_status_mib("VmRSS")
    step()
    step()
    print(json.dumps({"peak_mib": _proc_status_mib("VmHWM") - before}))


def bench_activation_checkpointing() -> tuple[float, float]:
    """Peak RSS of a step (fresh process per variant) and real tokens/s (interleaved) with and without AC."""
    plain, tokens, plain_losses = switch_step()
    checkpointed, _, checkpointed_losses = switch_step(checkpointed=True)
    med = interleaved_medians({"plain": plain, "ac": checkpointed}, repeats=5)
    assert checkpointed_losses == plain_losses  # recompute is exact: identical losses
    peak = {}
    for name in ("plain", "ac"):
        out = subprocess.run([sys.executable, __file__, "--switch-memory", name], capture_output=True, text=True,
                             check=True, cwd=HERE)  # fmt: skip
        peak[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    print(f"| train step, batch {SWITCH_BATCH} x {SWITCH_CONTEXT}, activation checkpointing off | "
          f"{tokens / med['plain']:.0f} tokens/s, peak +{peak['plain']:.0f} MiB | on | {tokens / med['ac']:.0f} "
          f"tokens/s, peak +{peak['ac']:.0f} MiB | {peak['ac'] / peak['plain']:.2f}x memory, "
          f"{med['plain'] / med['ac']:.2f}x speed |")  # fmt: skip
    return peak["ac"] / peak["plain"], med["plain"] / med["ac"]


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {REPEATS} interleaved repeats\n")
    print("| measurement | A | B | ratio |\n| --- | --- | --- | --- |")
    speedup = bench_tokenizer()
    context_ratio = bench_global_context()
    attention_speedup, attention_memory = bench_local_attention()
    compile_speedup, compile_break_even = bench_compile()
    ac_memory, ac_speed = bench_activation_checkpointing()
    print(f"\ntokenisation speed-up vs pure Python: {speedup:.0f}x (goal >= 50x)")
    print(f"per-token step cost, global context 200k / 2k: {context_ratio:.2f}x (goal <= 1.3x)")
    print(
        f"local attention at 4k tokens, blocked vs dense mask: {attention_speedup:.1f}x time, "
        f"{attention_memory:.0f}x peak memory"
    )
    print(
        f"torch.compile per block, tokens/s on / off: {compile_speedup:.2f}x (pays off after {compile_break_even:.0f} "
        "steps)"
    )
    print(f"activation checkpointing, peak step memory on / off: {ac_memory:.2f}x at {ac_speed:.2f}x the speed")
    assert math.isfinite(speedup)
    bench_scale.main()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-memory":
        peak_memory_child(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--switch-memory":
        switch_memory_child(sys.argv[2])
    else:
        main()
