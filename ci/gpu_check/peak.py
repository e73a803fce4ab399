"""Measured bf16 matmul peak (TFLOP/s), the denominator of every MFU in the same `make gpu-check` run.

Prints one JSON line: {"peak_tflops": ..., "n": ..., "device": ...}. Median of `repeats` timed n x n x n matmuls."""

from __future__ import annotations

import argparse
import json
import time

import torch


def matmul_peak(device: torch.device, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = matmul_peak(device, args.n, args.repeats)
    print(json.dumps({"peak_tflops": peak, "n": args.n, "device": name, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
