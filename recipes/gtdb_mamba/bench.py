"""CPU benchmark of the three things this recipe changes (run from the recipe folder: `python bench.py`).

1. Time to first training step on GTDB-layout fixtures of 200 and 2,000 tiny genomes, cold (index built) and
   cached (index memory-mapped). Goal: the cached start grows <= 2x across the 10x corpus.
2. Same-genome AUC on 4,000 validation embeddings (8M pairs): rank-based AUC on tensors vs the pair loop
   (Python loop over pairs, then sklearn) and vs sklearn on vectorised pairs. Goal >= 10x over the pair loop.
3. Training tokens/s (forward + backward) of the pure-PyTorch parallel scan vs the sequential recurrence.
4. Only on CUDA with mamba_ssm installed: its fused kernels vs the pure path (numbers go to BENCHMARKS.md).
6. `train.compile` on/off: training tokens/s of the embedder + head (compile time reported apart), interleaved;
   `train.activation_checkpointing` on/off: peak RSS and tokens/s at the same batch, each variant in a fresh process
   (peak RSS is per process), the variants alternating.
5. Scale (`bench_scale.py`, also runnable alone): parallel genome-index build at 1 and 2 workers vs the gunzip
   ceiling, peak RSS at 1x / 10x, per-genome decode cost and the extrapolated cold start for 75k genomes.

Baselines run in the same process on the same data, interleaved, after a warm-up; medians of 5 repeats.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # steady timings on a shared 2-core machine

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mambapy.mamba import MambaBlock, MambaConfig  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

import bench_scale  # noqa: E402
from biorecipes_shared import interleaved_medians  # noqa: E402
from config import compose_config  # noqa: E402
from metrics import pairwise_distances, same_genome_auc  # noqa: E402
from model import (  # noqa: E402
    CurricularFace,
    EmbedderConfig,
    EmbedderWithHead,
    GenomeFragmentEmbedder,
    make_mixer,
    mamba_ssm_available,
    set_speed_switches,
)
from scripts.build_sample import make_fixture  # noqa: E402
from train import run  # noqa: E402

REPEATS = 5
HERE = Path(__file__).resolve().parent


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def time_to_first_step(work: Path) -> dict[tuple[int, str], float]:
    """Median seconds from process-level start of `run` to the end of optimizer step 1."""
    fixtures = {}
    for n_genomes in (200, 2000):  # families x 2 genera x 2 genomes of 5 kbp
        fixtures[n_genomes] = make_fixture(
            work / f"gtdb_{n_genomes}",
            families=n_genomes // 4,
            genomes_per_genus=2,
            genome_bp=5_000,
            include_real=False,
        )
    times: dict[tuple[int, str], list[float]] = {(n, mode): [] for n in fixtures for mode in ("cold", "cached")}
    for repeat in range(REPEATS + 1):  # repeat 0 is the warm-up
        for n_genomes, root in fixtures.items():
            cache = work / f"cache_{n_genomes}"
            for mode in ("cold", "cached"):
                if mode == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                cfg = compose_config(
                    "sample",
                    [
                        f"data.genomes_root={root / 'database'}",
                        f"data.metadata_files=[{root / 'bac120_metadata_r0.tsv'},{root / 'ar53_metadata_r0.tsv'}]",
                        f"data.cache_dir={cache}",
                        f"output_dir={work / f'run_{n_genomes}_{mode}_{repeat}'}",
                        "data.val_species_target=20",
                        "data.n_val_genomes=20",
                        "train.max_steps=1",
                        "train.resume=false",
                        "val.at_start=false",
                        "val.fragments_per_genome=2",
                    ],
                )
                seconds = run(cfg)["time_to_first_step_s"]
                if repeat:
                    times[(n_genomes, mode)].append(seconds)
    return {key: _median(values) for key, values in times.items()}


def pair_loop_auc(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """The baseline: every pair visited in Python, then sklearn on the collected lists."""
    distances, same = [], []
    for i in range(len(embeddings)):
        for j in range(i + 1, len(embeddings)):
            distances.append(float(np.linalg.norm(embeddings[i] - embeddings[j])))
            same.append(labels[i] == labels[j])
    return roc_auc_score(same, -np.asarray(distances))


def sklearn_on_vectorised_pairs(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    distances, same = pairwise_distances(embeddings, labels)
    return roc_auc_score(same.numpy(), -distances.numpy())


def auc_pipeline() -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per method on 4,000 embeddings (500 genomes x 8) and on its first 1,000."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(500).repeat_interleave(8)
    centres = torch.randn(500, 256, generator=generator)
    embeddings = centres[labels] + 1.5 * torch.randn(4000, 256, generator=generator)
    small_e, small_l = embeddings[:1000], labels[:1000]
    full = {"rank AUC on tensors": [], "sklearn on vectorised pairs": []}
    small = {"rank AUC on tensors": [], "sklearn on vectorised pairs": [], "pair loop + sklearn": []}
    for repeat in range(REPEATS + 1):
        for name, fn in (
            ("rank AUC on tensors", lambda e, lab: same_genome_auc(e, lab)[0]),
            ("sklearn on vectorised pairs", sklearn_on_vectorised_pairs),
        ):
            for table, (e, lab) in ((full, (embeddings, labels)), (small, (small_e, small_l))):
                start = time.perf_counter()
                fn(e, lab)
                if repeat:
                    table[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        loop_auc = pair_loop_auc(small_e.numpy(), small_l.numpy())
        if repeat:
            small["pair loop + sklearn"].append(time.perf_counter() - start)
    assert abs(loop_auc - same_genome_auc(small_e, small_l)[0]) < 1e-9, "the methods disagree"
    return {k: _median(v) for k, v in full.items()}, {k: _median(v) for k, v in small.items()}


def scan_throughput() -> dict[str, float]:
    """Training tokens/s of one Mamba mixer (width 64, batch 4 x 256 tokens): parallel vs sequential scan."""
    torch.manual_seed(0)
    x = torch.randn(4, 256, 64)
    mixers = {
        "parallel scan (mambapy pscan)": MambaBlock(MambaConfig(d_model=64, n_layers=1, pscan=True)),
        "sequential recurrence": MambaBlock(MambaConfig(d_model=64, n_layers=1, pscan=False)),
    }
    seconds: dict[str, list[float]] = {name: [] for name in mixers}
    for repeat in range(REPEATS + 1):
        for name, mixer in mixers.items():
            start = time.perf_counter()
            mixer(x).sum().backward()
            if repeat:
                seconds[name].append(time.perf_counter() - start)
    return {name: x.shape[0] * x.shape[1] / _median(values) for name, values in seconds.items()}


def gpu_kernel_throughput() -> dict[str, float]:
    """On CUDA with mamba_ssm: training tokens/s of mamba_ssm's fused kernels vs the pure path, same weights."""
    torch.manual_seed(0)
    fused = make_mixer(EmbedderConfig(d_model=256, d_state=16)).cuda()
    pure = make_mixer(EmbedderConfig(d_model=256, d_state=16, backend="pure")).cuda()
    pure.load_state_dict(fused.state_dict())
    x = torch.randn(16, 2048, 256, device="cuda")
    seconds: dict[str, list[float]] = {"mamba_ssm kernels": [], "pure PyTorch (mambapy)": []}
    for repeat in range(REPEATS + 1):
        for name, mixer in (("mamba_ssm kernels", fused), ("pure PyTorch (mambapy)", pure)):
            torch.cuda.synchronize()
            start = time.perf_counter()
            mixer(x).sum().backward()
            torch.cuda.synchronize()
            if repeat:
                seconds[name].append(time.perf_counter() - start)
    return {name: x.shape[0] * x.shape[1] / _median(values) for name, values in seconds.items()}


# Section 6: a small embedder at the training crop (512 tokens); the full model's figures need a GPU.
SWITCH_MODEL = {"d_model": 64, "n_layers": 4, "d_state": 16}
SWITCH_BATCH = (8, 512)  # fragments x tokens, no padding (training crops are full)


def _switch_setup(compile_blocks: bool, activation_checkpointing: bool):
    """The same initial model, optimizer and batch for every variant; returns a function doing one training step."""
    torch.manual_seed(0)
    config = EmbedderConfig(**SWITCH_MODEL)
    model = EmbedderWithHead(GenomeFragmentEmbedder(config), CurricularFace(config.d_model, 100, scale=30.0))
    set_speed_switches(model.embedder, compile_blocks, activation_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 1024, SWITCH_BATCH)
    labels = torch.randint(0, 100, (SWITCH_BATCH[0],))

    def step() -> None:
        torch.nn.functional.cross_entropy(model(tokens, labels), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def compile_throughput() -> tuple[dict[str, float], float]:
    """Training tokens/s with and without compiled blocks (interleaved, after warm-up), and the compile seconds."""
    eager, compiled = _switch_setup(False, False), _switch_setup(True, False)
    start = time.perf_counter()
    compiled()  # the first call compiles forward and backward
    compile_s = time.perf_counter() - start
    seconds = interleaved_medians({"eager": eager, "compiled blocks": compiled}, repeats=REPEATS, warmup=1)
    tokens = SWITCH_BATCH[0] * SWITCH_BATCH[1]
    return {name: tokens / value for name, value in seconds.items()}, compile_s


def checkpointing_child(activation_checkpointing: bool) -> None:
    """In a fresh process: one warm-up step, then 2 timed ones; prints peak RSS (MiB) and the median step seconds."""
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    step = _switch_setup(False, activation_checkpointing)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"peak_rss_mib": peak, "setup_rss_mib": before, "step_s": statistics.median(times)}))


def checkpointing_memory(rounds: int = 3) -> dict[str, dict[str, float]]:
    """Activation checkpointing off/on, each in `rounds` fresh processes taken in turns; medians per variant."""
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(rounds):
        for name in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--checkpointing-child", name],
                cwd=HERE,
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    tokens = SWITCH_BATCH[0] * SWITCH_BATCH[1]
    return {
        name: {
            "peak_rss_mib": _median([r["peak_rss_mib"] for r in results]),
            "setup_rss_mib": _median([r["setup_rss_mib"] for r in results]),
            "tokens_per_s": tokens / _median([r["step_s"] for r in results]),
        }
        for name, results in runs.items()
    }


def speed_switches() -> None:
    """Section 6: prints the compile and activation-checkpointing table and their headline ratios."""
    size = f"width {SWITCH_MODEL['d_model']}, {SWITCH_MODEL['n_layers']} blocks, {SWITCH_BATCH[0]} x {SWITCH_BATCH[1]}"
    memory = checkpointing_memory()
    print(f"\n6. training switches on CPU ({size} tokens, fp32)")
    print(f"   {'activation checkpointing':<26} {'peak RSS MiB':>13} {'after setup':>12} {'tokens/s':>10}")
    for name, row in memory.items():
        print(f"   {name:<26} {row['peak_rss_mib']:>13.0f} {row['setup_rss_mib']:>12.0f} {row['tokens_per_s']:>10.0f}")
    rates, compile_s = compile_throughput()
    print(f"   {'torch.compile':<26} {'tokens/s':>13}")
    for name, rate in rates.items():
        print(f"   {name:<26} {rate:>13.0f}")
    print(f"   compile time of the first step: {compile_s:.0f} s")
    off, on = memory["off"], memory["on"]
    grown = (on["peak_rss_mib"] - on["setup_rss_mib"]) / (off["peak_rss_mib"] - off["setup_rss_mib"])
    print(f"   AC on / off: peak RSS {on['peak_rss_mib'] / off['peak_rss_mib']:.2f}x (growth over setup {grown:.2f}x), "
          f"tokens/s {on['tokens_per_s'] / off['tokens_per_s']:.2f}x")  # fmt: skip
    print(f"   compiled / eager tokens/s: {rates['compiled blocks'] / rates['eager']:.2f}x")


def main() -> None:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    logging.getLogger("gtdb_mamba").setLevel(logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {REPEATS} repeats after a warm-up\n")

    with tempfile.TemporaryDirectory(prefix="gtdb_bench_") as tmp:
        first_step = time_to_first_step(Path(tmp))
    print("1. time to first training step (median s)")
    print(f"   {'genomes':>8} {'cold':>8} {'cached':>8}")
    for n in (200, 2000):
        print(f"   {n:>8} {first_step[(n, 'cold')]:>8.2f} {first_step[(n, 'cached')]:>8.2f}")
    cached_growth = first_step[(2000, "cached")] / first_step[(200, "cached")]
    cold_over_cached = first_step[(2000, "cold")] / first_step[(2000, "cached")]

    full, small = auc_pipeline()
    # The pair loop costs the same per pair at any size; scale its measured per-pair cost to 8M pairs.
    loop_full_estimate = small["pair loop + sklearn"] * (4000 * 3999) / (1000 * 999)
    print("\n2. same-genome AUC pipeline (median s)")
    print(f"   {'method':<30} {'1,000 emb (0.5M pairs)':>24} {'4,000 emb (8M pairs)':>22}")
    for name in small:
        full_text = f"{full[name]:.3f}" if name in full else f"~{loop_full_estimate:.0f} (scaled)"
        print(f"   {name:<30} {small[name]:>24.3f} {full_text:>22}")
    loop_speedup_small = small["pair loop + sklearn"] / small["rank AUC on tensors"]
    loop_speedup_full = loop_full_estimate / full["rank AUC on tensors"]
    sklearn_speedup = full["sklearn on vectorised pairs"] / full["rank AUC on tensors"]

    tokens = scan_throughput()
    print("\n3. Mamba mixer training throughput on CPU (tokens/s, fwd+bwd, width 64, 4 x 256 tokens)")
    for name, rate in tokens.items():
        print(f"   {name:<32} {rate:>10.0f}")
    scan_speedup = tokens["parallel scan (mambapy pscan)"] / tokens["sequential recurrence"]

    if mamba_ssm_available():
        gpu = gpu_kernel_throughput()
        print(f"\n4. {torch.cuda.get_device_name()}: Mamba mixer training tokens/s (width 256, 16 x 2,048 tokens)")
        for name, rate in gpu.items():
            print(f"   {name:<32} {rate:>12.0f}")

    print("\nheadline ratios")
    print(f"   cached start, 2,000 vs 200 genomes:       {cached_growth:.2f}x  (goal <= 2x)")
    print(f"   cold vs cached start at 2,000 genomes:    {cold_over_cached:.2f}x")
    print(f"   AUC, pair loop / rank AUC (1,000 emb):    {loop_speedup_small:.0f}x  (measured)")
    print(
        f"   AUC, pair loop / rank AUC (4,000 emb):    {loop_speedup_full:.0f}x  (pair loop scaled per pair; goal >= 10x)"
    )
    print(f"   AUC, sklearn on 8M pairs / rank AUC:      {sklearn_speedup:.1f}x")
    print(f"   parallel scan / sequential recurrence:    {scan_speedup:.1f}x tokens/s")
    if mamba_ssm_available():
        ratio = gpu["mamba_ssm kernels"] / gpu["pure PyTorch (mambapy)"]
        print(f"   GPU: mamba_ssm kernels / pure PyTorch:    {ratio:.1f}x tokens/s")
    speed_switches()
    bench_scale.main()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--checkpointing-child"]:
        checkpointing_child(sys.argv[2] == "on")
    elif sys.argv[1:2] == ["--switches"]:  # only section 6
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        speed_switches()
    else:
        main()
