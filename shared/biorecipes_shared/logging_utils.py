"""Rank-0 console logging, a JSON-lines/TSV metrics writer with optional wandb, throughput and memory meters."""

from __future__ import annotations

import json
import logging
import math
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import torch

from .distributed import is_main_process
from .files import WriteError, atomic_write, describe_write_error

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str = "biorecipes", dist_ctx=None, level: int = logging.INFO) -> logging.Logger:
    """Logger that prints timestamped INFO on rank 0 and only warnings on other ranks."""
    is_main = dist_ctx.is_main if dist_ctx is not None else is_main_process()
    logger = logging.getLogger(name)
    if not any(getattr(h, "_biorecipes", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        handler._biorecipes = True
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level if is_main else logging.WARNING)
    return logger


def peak_memory() -> dict[str, float]:
    """Current and peak resident CPU memory of this process, and peak CUDA memory since start, in GiB."""
    rss = psutil.Process().memory_info().rss / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB; updated lazily
    stats = {"cpu_rss_gib": rss, "cpu_peak_rss_gib": max(rss, peak)}
    if torch.cuda.is_available():
        stats["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return stats


class ThroughputMeter:
    """Real-token throughput of this process over the steps since the last call to `rates()`.

    `tokens` counts real tokens (not padding); `positions` counts the token positions the model computed on (real
    tokens plus padding; defaults to `tokens` for a batch without padding). `rates()` gives `samples_per_s`,
    `tokens_per_s` (real tokens per second, this process / GPU) and `useful_token_fraction` (tokens / positions over
    the window): the fraction of the compute that was spent on data rather than padding."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._samples = 0
        self._tokens = 0
        self._positions = 0

    def update(self, samples: int = 0, tokens: int = 0, positions: int | None = None) -> None:
        self._samples += int(samples)
        self._tokens += int(tokens)
        self._positions += int(tokens if positions is None else positions)

    def rates(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        rates = {
            "samples_per_s": self._samples / elapsed,
            "tokens_per_s": self._tokens / elapsed,
            "useful_token_fraction": self._tokens / self._positions if self._positions else float("nan"),
        }
        self._start, self._samples, self._tokens, self._positions = now, 0, 0, 0
        return rates


def interleaved_medians(functions: dict[str, Any], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall seconds per call of each function: `warmup` untimed calls each, then `repeats` rounds in turns.

    The one benchmark timer of the recipes' bench scripts: timing A and B in alternation puts the same machine
    load on both, so their ratio is fair even on a busy machine (absolute seconds are not)."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _plain(value: Any) -> Any:
    """JSON-friendly number: tensors to floats, NaN/inf to strings JSON accepts."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Append one JSON line per `log()` to `metrics.jsonl`, a row to each chosen TSV, and optionally to wandb."""

    def __init__(
        self,
        out_dir: str | Path,
        dist_ctx=None,
        jsonl_name: str = "metrics.jsonl",
        tsv_files: dict[str, list[str]] | None = None,
        tsv_header: bool = True,
        wandb_init_args: dict[str, Any] | None = None,
        resume_step: int | None = None,
    ):
        self.enabled = dist_ctx.is_main if dist_ctx is not None else is_main_process()
        self.out_dir = Path(out_dir)
        self.jsonl_path = self.out_dir / jsonl_name
        self.tsv_files = dict(tsv_files or {})
        self._wandb_run = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._drop_records_after(resume_step)
        if tsv_header:
            for name, columns in self.tsv_files.items():
                path = self.out_dir / name
                if not path.exists() or path.stat().st_size == 0:  # a resumed run appends to the same file
                    path.write_text("\t".join(columns) + "\n")
        if wandb_init_args is not None:
            import wandb  # optional: only imported when asked for

            # wandb reads WANDB_API_KEY / WANDB_MODE itself; we never pass or log environment variables.
            self._wandb_run = wandb.init(**wandb_init_args)

    def _drop_records_after(self, step: int) -> None:
        """A run killed after its last checkpoint logged steps that the resumed run logs again: drop those lines."""
        if self.jsonl_path.is_file():
            kept = [line for line in self.jsonl_path.read_text().splitlines(keepends=True) if _step_of(line) <= step]
            with atomic_write(self.jsonl_path) as handle:
                handle.writelines(kept)
        for name, columns in self.tsv_files.items():
            path = self.out_dir / name
            if "step" not in columns or not path.is_file():
                continue
            column = columns.index("step")
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if not _tsv_row_after(line, column, step)]
            with atomic_write(path) as handle:
                handle.writelines(kept)

    def log(self, step: int, **metrics: Any) -> None:
        """Record the metrics of one step (rank 0 only; other ranks do nothing)."""
        if not self.enabled:
            return
        record = {"step": step, **{key: _plain(value) for key, value in metrics.items()}}
        with open(self.jsonl_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for name, columns in self.tsv_files.items():
            if all(column in record for column in columns):
                with open(self.out_dir / name, "a") as handle:
                    handle.write("\t".join(str(record[column]) for column in columns) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({key: value for key, value in record.items() if key != "step"}, step=step)

    def close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", -1))
    except (ValueError, AttributeError):
        return math.inf  # a line cut by a kill: drop it


def _tsv_row_after(line: str, column: int, step: int) -> bool:
    fields = line.rstrip("\n").split("\t")
    try:
        return float(fields[column]) > step
    except (IndexError, ValueError):
        return False  # the header


def read_metrics(jsonl_path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    with open(jsonl_path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_loss_curve(jsonl_path: str | Path, out_png: str | Path, key: str = "loss") -> Path | None:
    """Plot `key` against step from a metrics.jsonl file into a PNG (headless); None, with a warning, without matplotlib.

    matplotlib is imported only here, so it is needed only by runs that plot.
    """
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss curve plotted (pip install matplotlib)", stacklevel=2)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(jsonl_path) if isinstance(r.get(key), (int, float))]
    if not records:
        raise ValueError(f"{jsonl_path}: no records with a numeric {key!r}")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r[key] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".tmp-{out_png.name}")
    try:
        fig.savefig(tmp, format="png")
        tmp.replace(out_png)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(describe_write_error(err, out_png)) from err
    finally:
        plt.close(fig)
    return out_png
