"""What one training run builds once (`Run`) and what its loop advances (`RunState`).

`build_run(cfg, training)` reads and checks the data, builds the model (fresh or from a published folder), shards
it, makes the optimizer and schedule, registers them with the shared `TrainingRun` (`run.training`) and restores the
newest valid checkpoint through `TrainingRun.resume()` (the run contract: one command for every requeue).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from logging import Logger

import torch
from transformers import get_scheduler

from biorecipes_shared import (
    CheckpointError,
    ConfigError,
    DistributedContext,
    MetricsWriter,
    ThroughputMeter,
    TrainingRun,
    get_logger,
    seed_everything,
    setup_distributed,
)
from config import GeneformerConfig, recipe_path
from data import CellDataset, MaskingCollator, check_corpus_fingerprint, check_fills_a_batch
from fp8 import convert_for_fp8
from model import BertForMaskedLM, configure_layers, geneformer_config, hf_to_te_state_dict
from preprocess import read_vocab
from pretrained import check_folder_vocab, load_folder_weights


@dataclass
class Run:
    """What a run builds once and never replaces (the optimizer and schedule advance inside)."""

    cfg: GeneformerConfig
    training: TrainingRun  # the shared run contract: save interval, stop signals, rotation, finish
    dist_ctx: DistributedContext
    log: Logger
    vocab: list[str]
    dataset: CellDataset
    model: BertForMaskedLM  # the bare model (export, config)
    wrapped: torch.nn.Module  # what the loop calls: DDP / FSDP2 / the bare model
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    collator: MaskingCollator
    metrics: MetricsWriter | None = None  # opened once the resume step is known (it trims later records)
    meter: ThroughputMeter = field(default_factory=ThroughputMeter)


@dataclass
class RunState:
    """What the loop advances and a checkpoint restores: the step, the global data position, this run's losses."""

    step: int = 0
    position: dict = field(default_factory=lambda: {"epoch": 0, "cells_done": 0})
    losses: list[float] = field(default_factory=list)


def read_data(cfg: GeneformerConfig) -> tuple[list[str], int, CellDataset]:
    """Vocabulary, model vocab size and dataset, each checked (DataError / ConfigError, one line)."""
    vocab = read_vocab(recipe_path(cfg.data.vocab_path))
    vocab_size = cfg.model.vocab_size or len(vocab)
    if cfg.model.init_from:
        check_folder_vocab(recipe_path(cfg.model.init_from), vocab, cfg.data.vocab_path, vocab_size)
    if vocab_size < len(vocab):
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than {cfg.data.vocab_path} ({len(vocab)} tokens)")
    dataset = CellDataset(recipe_path(cfg.data.train_path), vocab_size, cfg.data.max_seq_length)
    check_corpus_fingerprint(recipe_path(cfg.data.train_path), recipe_path(cfg.data.vocab_path))
    return vocab, vocab_size, dataset


def build_model(cfg: GeneformerConfig, vocab_size: int, device: torch.device) -> BertForMaskedLM:
    """A fresh model (seeded, so identical on every rank without a broadcast), or the published folder's weights."""
    model_kwargs = {k: v for k, v in asdict(cfg.model).items() if k not in ("vocab_size", "init_from")}
    seed_everything(cfg.training.seed)
    config = geneformer_config(vocab_size, **model_kwargs)
    if not cfg.model.init_from:
        return BertForMaskedLM(config).to(device)
    plain = BertForMaskedLM(geneformer_config(vocab_size, **{**model_kwargs, "use_te_layers": False}))
    load_folder_weights(plain, recipe_path(cfg.model.init_from))
    if not config.use_te_layers:
        return plain.to(device)
    model = BertForMaskedLM(config)
    model.load_state_dict(hf_to_te_state_dict(plain.state_dict()), strict=False)  # TE's _extra_state stays its own
    return model.to(device)


def shard_model(model: BertForMaskedLM, cfg: GeneformerConfig, dist_ctx: DistributedContext) -> torch.nn.Module:
    """Wrap for data parallelism: FSDP2 per layer + root, megatron-fsdp, DDP, or nothing on one process."""
    if cfg.training.use_fsdp and cfg.training.fsdp_impl == "megatron":
        try:
            from megatron_fsdp import fully_shard_model
        except Exception as error:
            raise ConfigError(f"training.fsdp_impl=megatron: megatron_fsdp does not import ({error})") from None
        layer_type = type(model.bert.encoder["layer"][0])
        return fully_shard_model(module=model, fsdp_unit_modules=[layer_type])
    if cfg.training.use_fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder["layer"]:
            fully_shard(layer)
        return fully_shard(model)
    if dist_ctx.is_distributed:
        device_ids = [dist_ctx.device.index] if dist_ctx.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def make_optimizer(model: torch.nn.Module, cfg: GeneformerConfig):
    """AdamW without weight decay on biases and LayerNorms (BERT practice), with warmup + decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    training = cfg.training
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=training.learning_rate,
        betas=tuple(training.adam_betas),
    )
    if training.fsdp_impl == "megatron" and training.use_fsdp:
        from megatron_fsdp import fully_shard_optimizer

        optimizer = fully_shard_optimizer(optimizer=optimizer)
    scheduler = get_scheduler(
        training.lr_schedule,
        optimizer,
        num_warmup_steps=training.warmup_steps,
        num_training_steps=training.max_steps,
    )
    return optimizer, scheduler


def _warn_truncation(log: Logger, dataset: CellDataset, vocab: list[str], max_length: int) -> None:
    cut = f"only their first {max_length} tokens are used"
    if "<eos>" in vocab:
        cut += " (so they lose their <eos>)"
    log.warning(
        f"{dataset.num_truncated} of {len(dataset)} cells in {dataset.path} are longer than "
        f"data.max_seq_length={max_length}: {cut}; raise data.max_seq_length and "
        "model.max_position_embeddings to keep them"
    )


def build_model_and_optimizer(run_parts: dict, cfg: GeneformerConfig, vocab_size: int) -> None:
    """Model (fp8 conversion, compile/checkpointing and sharding applied in that order), optimizer, schedule."""
    dist_ctx, log = run_parts["dist_ctx"], run_parts["log"]
    model = build_model(cfg, vocab_size, dist_ctx.device)
    seed_everything(cfg.training.seed + dist_ctx.rank)  # then different dropout per rank
    if converted := convert_for_fp8(model, cfg):  # torchao: Linear -> Float8Linear, before sharding
        log.info(f"fp8 (torchao): {len(converted)} Linear layers converted")
    configure_layers(model, cfg.training.compile, cfg.training.activation_checkpointing)  # before sharding wraps them
    source = f" from {cfg.model.init_from}" if cfg.model.init_from else ""
    count = len(run_parts["dataset"])
    log.info(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters{source}, {count} cells")
    wrapped = shard_model(model, cfg, dist_ctx)
    optimizer, scheduler = make_optimizer(wrapped, cfg)
    run_parts.update(model=model, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler)


def build_run(cfg: GeneformerConfig, training: TrainingRun, logger_factory=get_logger) -> tuple[Run, RunState]:
    """Everything before the first step, then the resume point. Reads and checks every input before the run folder
    is taken or written; raises ConfigError / DataError / CheckpointError / RunFolderBusy (one line each)."""
    vocab, vocab_size, dataset = read_data(cfg)
    dist_ctx = setup_distributed(seed=cfg.training.seed)
    if cfg.training.use_fsdp and not dist_ctx.is_distributed:
        raise ConfigError(
            "training.use_fsdp=true shards over several processes: launch with torchrun --nproc_per_node>1"
        )
    check_fills_a_batch(dataset, cfg.data.micro_batch_size, dist_ctx.world_size, cfg.data.batching)
    log = logger_factory("geneformer", dist_ctx)
    if dataset.num_truncated and dist_ctx.is_main:
        _warn_truncation(log, dataset, vocab, cfg.data.max_seq_length)
    parts = {"cfg": cfg, "training": training, "dist_ctx": dist_ctx, "log": log, "vocab": vocab, "dataset": dataset}
    build_model_and_optimizer(parts, cfg, vocab_size)
    mask_generator = torch.Generator().manual_seed(cfg.training.seed + 1000 * (dist_ctx.rank + 1))
    collator = MaskingCollator(
        vocab, cfg.data.mlm_probability, cfg.data.pad_to_multiple_of, mask_generator,
        max_length=cfg.model.max_position_embeddings,  # never pad past the position table
    )  # fmt: skip
    run = Run(**parts, collator=collator)
    return run, restore(run)


def restore(run: Run) -> RunState:
    """Register what a checkpoint holds with `run.training`, then resume: a fresh RunState, or the saved one (model,
    optimizer, schedule, masks, data position restored).

    The data position is global (identical on every rank), so a checkpoint of another world size continues exactly
    from the next cell of the stream (with a warning: masks and dropout then differ from an uninterrupted run)."""
    state = RunState()
    run.training.register(
        run.wrapped, run.optimizer, run.scheduler,
        data_state=lambda: dict(state.position),
        extra=lambda: {"data_position": dict(state.position), "world_size": run.dist_ctx.world_size},
        generators={"masking": run.collator.generator},
    )  # fmt: skip
    try:
        saved = run.training.resume()
    except CheckpointError as error:
        if "shape mismatch" not in str(error):
            raise
        # Usually the same output_dir rerun with other model.* values: say so, since resuming is the default.
        raise CheckpointError(
            f"{error}; the model config differs from the run that saved it: use a new training.output_dir"
        ) from None
    if saved is not None:
        run.log.info(f"resumed from {saved.path} at step {saved.step}; continuing with step {saved.step + 1}")
        state.step, state.position = saved.step, dict(saved.data_state)
    return state
