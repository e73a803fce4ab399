"""Train the bidirectional Mamba genome-fragment embedder on GTDB with a CurricularFace head.

    torchrun --nproc_per_node=4 train.py data.genomes_root=... 'data.metadata_files=[...]'
    python train.py --config-name sample            # the bundled fixture (see train_sample.sh)

Each training genome is a class; every `train.steps_per_epoch` optimizer steps the model embeds a fixed set of
fragments from held-out families and reports the same-genome ROC AUC (AUC_log.tsv, pairwise_distances_histogram.png).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from biorecipes_shared.checkpoint import (
    CheckpointError,
    PreemptionHandler,
    export_safetensors,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from biorecipes_shared.distributed import all_reduce_mean, barrier, setup_distributed, teardown_distributed
from biorecipes_shared.logging_utils import MetricsWriter, ThroughputMeter, get_logger, peak_memory, plot_loss_curve
from data import (
    FragmentSampler,
    KmerTokenizer,
    TrainBatches,
    assign_classes,
    check_crop,
    check_data_fingerprint,
    train_loader,
    validation_fragments,
)
from metrics import same_genome_auc, write_distance_histogram
from model import CurricularFace, EmbedderConfig, GenomeFragmentEmbedder, mamba_ssm_available
from preprocess import GtdbDataError, build_or_load_index, cached_family_split, shard_for_rank

TSV_FILES = {"log_file.txt": ["loss", "step"], "AUC_log.tsv": ["auc", "step"]}


class EmbedderWithHead(nn.Module):
    """The trained unit: embedder + CurricularFace head, so DDP and checkpoints see one module."""

    def __init__(self, embedder: GenomeFragmentEmbedder, head: CurricularFace):
        super().__init__()
        self.embedder, self.head = embedder, head

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedder(tokens), labels)


def prepare_data(cfg: DictConfig, dist_ctx, log):
    """Split the metadata, build or load this rank's training index and the validation index."""
    data = cfg.data
    split_options = {
        key: data[key]
        for key in (
            "contamination_column",
            "max_contamination",
            "val_species_target",
            "n_val_genomes",
            "family_count_cap",
            "val_per_genus",
            "train_per_genus",
        )
    }
    split = cached_family_split(
        list(data.metadata_files), data.genomes_root, data.cache_dir, seed=cfg.seed, **split_options
    )
    log.info("split: %s", split.stats)
    shard = shard_for_rank(len(split.train), dist_ctx.rank, dist_ctx.world_size)
    show_progress = dist_ctx.is_main
    train_index = build_or_load_index(
        [split.train[i] for i in shard],
        shard,
        data.cache_dir,
        f"train-rank{dist_ctx.rank}of{dist_ctx.world_size}",
        show_progress,
        workers=data.index_workers,
    )
    val_labels = list(range(len(split.val)))
    if dist_ctx.local_rank == 0:  # one builder per node; the others wait and memory-map it
        build_or_load_index(split.val, val_labels, data.cache_dir, "val", show_progress, workers=data.index_workers)
    barrier()
    val_index = build_or_load_index(split.val, val_labels, data.cache_dir, "val", False, workers=data.index_workers)

    train_sampler = FragmentSampler(train_index, data.fragment_bp, data.max_n_fraction)
    val_sampler = FragmentSampler(val_index, data.fragment_bp, data.max_n_fraction)
    assign_classes(train_sampler)  # a skipped genome is not a class
    train_skipped = all_reduce_mean(float(len(train_index.skipped) + len(train_sampler.dropped))) * dist_ctx.world_size
    val_skipped = len(val_index.skipped) + len(val_sampler.dropped)
    (log.warning if train_skipped or val_skipped else log.info)(
        "genomes: %d training classes (%d on this rank), %d validation; skipped %d training and %d validation genomes",
        train_sampler.n_classes,
        len(train_sampler),
        len(val_sampler),
        round(train_skipped),
        val_skipped,
    )
    if len(val_sampler) < 2:
        raise GtdbDataError(f"only {len(val_sampler)} usable validation genome(s) left; the AUC needs at least 2")
    return split, train_sampler, val_sampler


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
    optimizer = make_optimizer(model, cfg)
    min_ratio = cfg.train.min_lr / cfg.train.lr
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


def run(cfg: DictConfig) -> dict:
    """The whole training run; returns a summary (time to first step, final loss, AUCs)."""
    t_start = time.perf_counter()
    dist_ctx = setup_distributed(cfg.seed)
    log = get_logger("gtdb_mamba", dist_ctx)
    for name in ("preprocess", "data"):
        get_logger(name, dist_ctx)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    try:
        split, train_sampler, val_sampler = prepare_data(cfg, dist_ctx, log)
        tokenizer = KmerTokenizer(cfg.data.kmer)
        val_tokens, val_labels = validation_fragments(
            val_sampler,
            tokenizer,
            cfg.val.fragments_per_genome,
            cfg.data.val_tokens,
            cfg.seed,
            dist_ctx.rank,
            cfg.data.reverse_complement,
        )
        model_config = EmbedderConfig(vocab_size=tokenizer.vocab_size, pad_token=tokenizer.pad_token, **cfg.model)
        model, optimizer, scheduler = build_model(cfg, model_config, train_sampler.n_classes, dist_ctx.device)
        embedder = model.embedder
        step = 0
        resume_from = latest_checkpoint(ckpt_dir) if cfg.train.resume else None
        if resume_from is not None:
            try:
                step = load_checkpoint(resume_from, model, optimizer, scheduler).step
            except RuntimeError as err:  # CheckpointError, or load_state_dict's multi-line size mismatch
                raise resume_error(resume_from, err) from None
            log.info("resumed from %s (step %d)", resume_from, step)
        check_data_fingerprint(run_dir, cfg.data, split, train_sampler, resuming=resume_from is not None)
        backend = "mamba_ssm" if cfg.model.backend == "auto" and mamba_ssm_available() else "pure PyTorch (mambapy)"
        log.info(
            "model: %.2fM parameters, Mamba backend %s, device %s, world size %d",
            sum(p.numel() for p in model.parameters()) / 1e6,
            backend,
            dist_ctx.device,
            dist_ctx.world_size,
        )
        trained = DistributedDataParallel(model) if dist_ctx.is_distributed else model
        accumulation = cfg.train.grad_accumulation
        dataset = TrainBatches(
            train_sampler,
            tokenizer,
            cfg.train.batch_size,
            cfg.data.train_tokens,
            cfg.seed,
            dist_ctx.rank,
            cfg.data.reverse_complement,
        )
        stop_step = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
        # Batch b of this rank is a pure function of (seed, rank, b): resuming at `step` needs no loader state.
        loader = train_loader(dataset, step * accumulation, (stop_step - step) * accumulation, cfg.data.num_workers)
        summary = {"aucs": [], "losses": [], "time_to_first_step_s": None, "start_step": step}
        with MetricsWriter(run_dir, dist_ctx, tsv_files=TSV_FILES) as metrics, PreemptionHandler() as preempt:
            if cfg.val.at_start and step == 0:
                auc = validate(embedder, val_tokens, val_labels, cfg, dist_ctx, run_dir, step, metrics)
                summary["aucs"].append((step, auc))
                log.info("step %d: validation AUC %.4f", step, auc)
            meter, micro, loss_sum, window_loss, window_steps = ThroughputMeter(), 0, 0.0, 0.0, 0
            for batch in loader:
                tokens, labels = batch["tokens"].to(dist_ctx.device), batch["labels"].to(dist_ctx.device)
                sync = (micro + 1) % accumulation == 0
                # DDP all-reduces gradients only on the last micro-batch of an accumulation group.
                with trained.no_sync() if dist_ctx.is_distributed and not sync else nullcontext():
                    with autocast(cfg, dist_ctx):
                        loss = F.cross_entropy(trained(tokens, labels), labels) / accumulation
                    loss.backward()
                loss_sum += loss.item()
                meter.update(samples=tokens.shape[0], tokens=tokens.numel())
                micro += 1
                if not sync:
                    continue
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window_loss, window_steps, loss_sum = window_loss + loss_sum, window_steps + 1, 0.0
                if summary["time_to_first_step_s"] is None:
                    summary["time_to_first_step_s"] = time.perf_counter() - t_start
                    log.info("time to first step: %.2f s", summary["time_to_first_step_s"])
                if step % cfg.train.log_every == 0 or step == stop_step:
                    mean_loss = float(all_reduce_mean(window_loss / window_steps))  # mean since the last log line
                    window_loss, window_steps = 0.0, 0
                    summary["losses"].append((step, mean_loss))
                    metrics.log(
                        step,
                        loss=mean_loss,
                        lr=scheduler.get_last_lr()[0],
                        grad_norm=float(grad_norm),
                        curricular_t=float(model.head.t),
                        **meter.rates(),
                        **peak_memory(),
                    )
                    log.info("step %d: loss %.4f", step, mean_loss)
                end_of_epoch = step % cfg.train.steps_per_epoch == 0
                if end_of_epoch:
                    auc = validate(embedder, val_tokens, val_labels, cfg, dist_ctx, run_dir, step, metrics)
                    summary["aucs"].append((step, auc))
                    log.info("step %d: validation AUC %.4f", step, auc)
                stopping = step == stop_step or preempt.should_stop()
                if end_of_epoch or stopping or step % cfg.train.checkpoint_every == 0:
                    save_checkpoint(
                        ckpt_dir,
                        step,
                        model,
                        optimizer,
                        scheduler,
                        data_state={"step": step},
                        keep_last_k=cfg.train.keep_last_k,
                    )
                if stopping:
                    break
        if step >= cfg.train.max_steps and dist_ctx.is_main:
            export_safetensors(
                embedder, {**dataclasses.asdict(model_config), "kmer": cfg.data.kmer}, run_dir / "export"
            )
            if (run_dir / "metrics.jsonl").is_file() and summary["losses"]:
                plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        summary["step"] = step
        return summary
    finally:
        teardown_distributed()


def resume_error(path: Path, err: Exception) -> CheckpointError:
    """One line for a checkpoint that cannot be loaded into this run's model (another size, class count, k)."""
    detail = " ".join(str(err).split()).removeprefix(f"{path}: ")  # torch's message spans lines, tab-indented
    if len(detail) > 300:  # torch lists every mismatched tensor: a changed d_model touches all of them
        detail = detail[:300] + " ..."
    return CheckpointError(
        f"{path}: cannot resume: the checkpoint does not fit this model/config ({detail}); "
        "use train.resume=false or a new run_dir"
    )


# Minimum of each integer setting: below it the run would divide by zero, loop zero times or build an empty tensor,
# mostly long after the index build. The AUC needs 2 genomes with 2 fragments each.
MIN_COUNTS = {
    "data.kmer": 1,
    "data.fragment_bp": 1,
    "data.train_tokens": 1,
    "data.val_tokens": 1,
    "data.val_species_target": 1,
    "data.family_count_cap": 1,
    "data.n_val_genomes": 2,
    "data.val_per_genus": 1,
    "data.train_per_genus": 1,
    "data.num_workers": 0,
    "model.d_model": 1,
    "model.n_layers": 1,
    "model.d_state": 1,
    "model.d_conv": 1,
    "model.expand": 1,
    "train.batch_size": 1,
    "train.grad_accumulation": 1,
    "train.max_steps": 1,
    "train.steps_per_epoch": 1,
    "train.warmup_steps": 0,
    "train.log_every": 1,
    "train.checkpoint_every": 1,
    "val.fragments_per_genome": 2,
    "val.batch_size": 1,
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config(cfg: DictConfig) -> None:
    """Fail fast, in one line, on settings that would otherwise fail deep inside the run."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise GtdbDataError(f"required setting(s) not given: {', '.join(missing)} (pass them as key=value)")
    choices = {
        "model.norm": ("layernorm", "rmsnorm"),
        "model.pooling": ("sum", "mean"),
        "model.backend": ("auto", "pure"),
    }
    for key, allowed in choices.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise GtdbDataError(f"{key}={OmegaConf.select(cfg, key)!r}: must be one of {', '.join(allowed)}")
    for key, minimum in MIN_COUNTS.items():
        value = OmegaConf.select(cfg, key)
        if not _is_int(value) or value < minimum:
            raise GtdbDataError(f"{key} must be an integer >= {minimum}, got {value!r}")
    stop = cfg.train.stop_at_step
    if stop is not None and (not _is_int(stop) or stop < 1):
        raise GtdbDataError(f"train.stop_at_step must be null or an integer >= 1, got {stop!r}")
    lr, min_lr = cfg.train.lr, cfg.train.min_lr
    if not _is_number(lr) or lr <= 0:  # the schedule divides by it
        raise GtdbDataError(f"train.lr must be a number > 0, got {lr!r}")
    if not _is_number(min_lr) or min_lr < 0:
        raise GtdbDataError(f"train.min_lr must be a number >= 0, got {min_lr!r}")
    # Checked here too (not only by the data classes) so that it fails before the split and index are built.
    tokenizer = KmerTokenizer(cfg.data.kmer)
    check_crop(cfg.data.train_tokens, cfg.data.fragment_bp, tokenizer, "data.train_tokens")
    check_crop(cfg.data.val_tokens, cfg.data.fragment_bp, tokenizer, "data.val_tokens")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        check_config(cfg)
        run(cfg)
    except (GtdbDataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
