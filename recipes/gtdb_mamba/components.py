"""The trained unit (embedder + CurricularFace head), its optimizer and schedule, and validation."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from biorecipes_shared.checkpoint import CheckpointError
from biorecipes_shared.distributed import all_reduce_mean
from biorecipes_shared.logging_utils import plot_loss_curve
from biorecipes_shared.run import ConfigError
from data import KmerTokenizer
from exports import check_fits, read_export_config
from metrics import same_genome_auc, write_distance_histogram
from model import CurricularFace, EmbedderConfig, GenomeFragmentEmbedder, set_speed_switches


class EmbedderWithHead(nn.Module):
    """The trained unit: embedder + CurricularFace head, so DDP and checkpoints see one module."""

    def __init__(self, embedder: GenomeFragmentEmbedder, head: CurricularFace):
        super().__init__()
        self.embedder, self.head = embedder, head

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedder(tokens), labels)


def lr_lambda(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at max_steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(cfg: DictConfig, model_config: EmbedderConfig, n_classes: int, device: torch.device):
    """Embedder + CurricularFace head (identical on every rank), AdamW, warmup-cosine schedule."""
    torch.manual_seed(cfg.seed)
    embedder = GenomeFragmentEmbedder(model_config)
    head = CurricularFace(model_config.d_model, n_classes, cfg.head.scale, cfg.head.margin, cfg.head.t_momentum)
    model = EmbedderWithHead(embedder, head).to(device)
    set_speed_switches(embedder, cfg.train.compile, cfg.train.activation_checkpointing)
    optimizer = make_optimizer(model, cfg)
    min_ratio = cfg.train.min_lr / cfg.train.lr if cfg.train.lr > 0 else 1.0  # lr=0: a frozen run
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.train.warmup_steps, cfg.train.max_steps, min_ratio)
    )
    return model, optimizer, scheduler


def make_optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norm weights and Mamba's A_log / D (as in mamba-ssm)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim < 2 or getattr(param, "_no_weight_decay", False) or name.endswith(("A_log", ".D"))
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def autocast(cfg: DictConfig, dist_ctx):
    """bf16 autocast on CUDA when train.bf16; a no-op context on CPU."""
    enabled = bool(cfg.train.bf16) and dist_ctx.device.type == "cuda"
    return torch.autocast(dist_ctx.device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def validate(embedder, val_tokens, val_labels, cfg, dist_ctx, run_dir: Path, step: int, metrics) -> float:
    """Embed the validation fragments, AUC over all pairs (averaged over ranks), write the histogram on rank 0."""
    embedder.eval()
    embeddings = []
    for start in range(0, len(val_tokens), cfg.val.batch_size):
        with autocast(cfg, dist_ctx):
            embeddings.append(
                embedder(val_tokens[start : start + cfg.val.batch_size].to(dist_ctx.device)).float().cpu()
            )
    embedder.train()
    auc, distances, same = same_genome_auc(torch.cat(embeddings), val_labels)
    auc = float(all_reduce_mean(auc))
    if dist_ctx.is_main:
        write_distance_histogram(run_dir / "pairwise_distances_histogram.png", distances, same, auc, step)
    metrics.log(step, auc=auc)
    return auc


def plot_curve(layout) -> None:
    """loss_curve.png from metrics.jsonl (the shared plotter writes atomically: a failure is one WriteError line)."""
    with contextlib.suppress(ValueError):  # no numeric loss logged (nothing was left to train)
        plot_loss_curve(layout.metrics, layout.loss_curve)


def refuse_other_world_size(path: Path, world_size: int) -> None:
    """Each rank trains its own genome shard with its own batch stream: another world size cannot continue them."""
    saved = int(json.loads((path / "manifest.json").read_text()).get("world_size", 1))
    if saved != world_size:
        raise CheckpointError(
            f"{path} was saved by {saved} process(es) and this run has {world_size}: relaunch with {saved} "
            "process(es) (training genomes and batches are sharded per process), or start a new run_dir"
        )


def resume_error(path: Path, err: Exception) -> CheckpointError:
    """One line for a checkpoint that cannot be loaded into this run's model (another size, class count, k)."""
    detail = " ".join(str(err).split()).removeprefix(f"{path}: ")  # torch's message spans lines, tab-indented
    if len(detail) > 300:  # torch lists every mismatched tensor: a changed d_model touches all of them
        detail = detail[:300] + " ..."
    return CheckpointError(
        f"{path}: cannot resume: the checkpoint does not fit this model/config ({detail}); use a new run_dir"
    )


def compile_error(cfg: DictConfig, err: Exception) -> Exception:
    """One ConfigError line for a torch.compile failure under `train.compile` (else the error itself)."""
    if not cfg.train.compile:
        return err
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ConfigError(f"train.compile=true: torch.compile failed here ({reason}); set train.compile=false")


def embedder_config(cfg: DictConfig) -> EmbedderConfig:
    """The embedder's hyper-parameters: `model.*` plus the vocabulary of `data.kmer`."""
    tokenizer = KmerTokenizer(cfg.data.kmer)
    return EmbedderConfig(vocab_size=tokenizer.vocab_size, pad_token=tokenizer.pad_token, **cfg.model)


def check_init_from(cfg: DictConfig) -> None:
    """`train.init_from` must be an export of this recipe that fits this model (RunError, one line)."""
    path = Path(cfg.train.init_from)
    check_fits(read_export_config(path), embedder_config(cfg), cfg.data.kmer, path)
