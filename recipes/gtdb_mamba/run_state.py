"""What a training run builds once (`Run`: settings, data, model, optimizer, schedule, the shared `TrainingRun`,
metrics) and what its loop advances (`RunState`), restored through `TrainingRun.resume()`.

`build_run(cfg, dist_ctx, log, training)` builds both; the order matters for the run contract: the checkpoint to
continue from is chosen first (taking the run folder), a checkpoint of another world size is refused before the slow
index build, and the data fingerprint is checked after the weights loaded (a checkpoint of another shape gets its own
error first).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from biorecipes_shared import (
    CheckpointError,
    ConfigError,
    MetricsWriter,
    ThroughputMeter,
    TrainingRun,
)
from config import Config
from data import KmerTokenizer, TrainBatches, check_data_fingerprint, prepare_data, train_loader, validation_fragments
from export import check_fits, init_from, read_export_config
from model import (
    CurricularFace,
    EmbedderConfig,
    EmbedderWithHead,
    GenomeFragmentEmbedder,
    autocast,
    mamba_ssm_available,
    set_speed_switches,
)

TSV_FILES = {"log_file.txt": ["loss", "step"], "AUC_log.tsv": ["auc", "step"]}  # the seed's logs, kept


@dataclass
class Run:
    """What start-up builds, once per process, before the first step."""

    cfg: Config
    dist_ctx: object
    log: object
    training: TrainingRun  # the shared run contract: saves, stop signals, resume, finish
    model: EmbedderWithHead
    trained: nn.Module  # the DDP wrapper, or the model itself in one process
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    model_config: EmbedderConfig
    dataset: TrainBatches
    val_tokens: torch.Tensor  # (fragments, val_tokens) token ids, fixed for the whole run
    val_labels: torch.Tensor  # (fragments,) validation genome of each fragment
    metrics: MetricsWriter | None = None
    meter: ThroughputMeter = field(default_factory=ThroughputMeter)

    def autocast(self):
        return autocast(self.dist_ctx.device, self.cfg.train.bf16)

    def batches(self, step: int):
        """The micro-batches after optimizer step `step`: batch b of this rank is a pure function of (seed, rank, b),
        so resuming at `step` needs no loader state."""
        accumulation = self.cfg.train.grad_accumulation
        first, count = step * accumulation, (self.cfg.stop_step - step) * accumulation
        return iter(train_loader(self.dataset, first, count, self.cfg.data.num_workers))


@dataclass
class RunState:
    """Where the run is. `control()` goes into every checkpoint so that a resumed run logs what the uninterrupted
    one would (the loss window spans checkpoints); CurricularFace's running `t` is a model buffer, saved with it."""

    step: int = 0
    start_step: int = 0
    window_loss: float = 0.0  # summed step losses since the last log line
    window_steps: int = 0
    losses: list = field(default_factory=list)
    aucs: list = field(default_factory=list)
    t_start: float = field(default_factory=time.perf_counter)
    time_to_first_step_s: float | None = None
    preempted: bool = False

    def control(self) -> dict:
        return {"window_loss": self.window_loss, "window_steps": self.window_steps}

    def summary(self) -> dict:
        keys = ("aucs", "losses", "time_to_first_step_s", "start_step", "step", "preempted")
        return {key: getattr(self, key) for key in keys}


def build_run(cfg: Config, dist_ctx, log, training: TrainingRun, t_start: float) -> tuple[Run, RunState]:
    """Data, validation fragments, model, optimizer, schedule; then the checkpoint (or `train.init_from`) restored.

    Raises CheckpointError (one line) for a checkpoint of another world size or shape, GtdbDataError for other data.
    """
    resume_from = training.checkpoint_to_resume()  # chosen once: training.resume() loads this one
    if resume_from is not None:
        refuse_other_world_size(resume_from, dist_ctx.world_size)
    tokenizer = KmerTokenizer(cfg.data.kmer)
    split, train_sampler, val_sampler = prepare_data(cfg, dist_ctx, log)
    val_tokens, val_labels = validation_fragments(
        val_sampler, tokenizer, cfg.val.fragments_per_genome, cfg.data.val_tokens, cfg.seed, dist_ctx.rank,
        cfg.data.reverse_complement,
    )  # fmt: skip
    model_config = embedder_config(cfg)
    model = build_model(cfg, model_config, train_sampler.n_classes, dist_ctx.device)
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.min_lr)
    dataset = TrainBatches(
        train_sampler, tokenizer, cfg.train.batch_size, cfg.data.train_tokens, cfg.seed, dist_ctx.rank,
        cfg.data.reverse_complement,
    )  # fmt: skip
    trained = DistributedDataParallel(model) if dist_ctx.is_distributed else model
    run = Run(cfg, dist_ctx, log, training, model, trained, optimizer, scheduler, model_config, dataset, val_tokens,
              val_labels)  # fmt: skip
    state = restore(run, resume_from, t_start)
    check_data_fingerprint(training.layout.output_dir, cfg.data, split, train_sampler, resume_from is not None)
    run.metrics = MetricsWriter(training.layout.output_dir, dist_ctx, tsv_files=TSV_FILES, resume_step=state.step)
    return run, state


def restore(run: Run, resume_from: Path | None, t_start: float) -> RunState:
    """A fresh RunState (with `train.init_from` weights if set), or the one saved in `resume_from` (weights incl.
    CurricularFace t, optimizer, schedule, RNG, the loss window)."""
    state = RunState(t_start=t_start)
    run.training.register(run.model, run.optimizer, run.scheduler, data_state=lambda: {"step": state.step},
                          extra=state.control)  # fmt: skip
    try:
        saved = run.training.resume()
    except RuntimeError as err:  # CheckpointError, or load_state_dict's multi-line size mismatch
        raise resume_error(resume_from, err) from None
    if saved is not None:
        state.step = state.start_step = saved.step
        state.window_loss = float(saved.extra.get("window_loss", 0.0))
        state.window_steps = int(saved.extra.get("window_steps", 0))
        run.log.info("resumed from %s (step %d)", resume_from, saved.step)
    elif run.cfg.train.init_from:
        init_from(run.cfg.train.init_from, run.model.embedder, run.model_config, run.cfg.data.kmer)
        run.log.info("embedder initialised from %s (new CurricularFace head for %d classes)", run.cfg.train.init_from,
                     run.model.head.weight.shape[0])  # fmt: skip
    backend = "mamba_ssm" if run.cfg.model.backend == "auto" and mamba_ssm_available() else "pure PyTorch (mambapy)"
    run.log.info(
        "model: %.2fM parameters, Mamba backend %s, device %s, world size %d",
        sum(p.numel() for p in run.model.parameters()) / 1e6, backend, run.dist_ctx.device, run.dist_ctx.world_size,
    )  # fmt: skip
    return state


def build_model(cfg: Config, model_config: EmbedderConfig, n_classes: int, device: torch.device) -> EmbedderWithHead:
    """Embedder + CurricularFace head, identical on every rank (seeded), with the speed switches applied."""
    torch.manual_seed(cfg.seed)
    embedder = GenomeFragmentEmbedder(model_config)
    head = CurricularFace(model_config.d_model, n_classes, cfg.head.scale, cfg.head.margin, cfg.head.t_momentum)
    model = EmbedderWithHead(embedder, head).to(device)
    set_speed_switches(embedder, cfg.train.compile, cfg.train.activation_checkpointing)
    return model


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norm weights and Mamba's A_log / D (as in mamba-ssm)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim < 2 or getattr(param, "_no_weight_decay", False) or name.endswith(("A_log", ".D"))
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, max_steps: int, min_lr: float) -> LRScheduler:
    """The seed's schedule from torch's schedulers: lr * (step + 1) / warmup for step < warmup, then cosine decay
    from lr to `min_lr` at `max_steps` (the cosine spans max(1, max_steps - warmup) steps). lr = 0 stays 0 (a frozen
    run). Equal to the seed's closed formula within float rounding (tests/test_train.py)."""
    base_lr = optimizer.param_groups[0]["lr"]
    decay = CosineAnnealingLR(optimizer, T_max=max(1, max_steps - warmup), eta_min=min_lr if base_lr > 0 else 0.0)
    if warmup == 0:
        return decay
    ramp = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return SequentialLR(optimizer, [ramp, decay], milestones=[warmup])


def embedder_config(cfg: Config) -> EmbedderConfig:
    """The embedder's hyper-parameters: `model.*` plus the vocabulary of `data.kmer`."""
    tokenizer = KmerTokenizer(cfg.data.kmer)
    return EmbedderConfig(vocab_size=tokenizer.vocab_size, pad_token=tokenizer.pad_token, **asdict(cfg.model))


def check_init_from(cfg: Config) -> None:
    """`train.init_from` must be an export of this recipe that fits this model (ExportError, one line)."""
    path = Path(cfg.train.init_from)
    check_fits(read_export_config(path), embedder_config(cfg), cfg.data.kmer, path)


def refuse_other_world_size(path: Path, world_size: int) -> None:
    """Each rank trains its own genome shard with its own batch stream: another world size cannot continue them."""
    saved = int(json.loads((path / "manifest.json").read_text()).get("world_size", 1))
    if saved != world_size:
        raise CheckpointError(
            f"{path} was saved by {saved} process(es) and this run has {world_size}: relaunch with {saved} "
            "process(es) (training genomes and batches are sharded per process), or start a new output_dir"
        )


def resume_error(path: Path | None, err: Exception) -> CheckpointError:
    """One line for a checkpoint that cannot be loaded into this run's model (another size, class count, k)."""
    detail = " ".join(str(err).split()).removeprefix(f"{path}: ")  # torch's message spans lines, tab-indented
    if len(detail) > 300:  # torch lists every mismatched tensor: a changed d_model touches all of them
        detail = detail[:300] + " ..."
    return CheckpointError(
        f"{path}: cannot resume: the checkpoint does not fit this model/config ({detail}); use a new output_dir"
    )


def compile_error(cfg: Config, err: Exception) -> Exception:
    """One ConfigError line for a torch.compile failure under `train.compile` (else the error itself)."""
    if not cfg.train.compile:
        return err
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ConfigError(f"train.compile=true: torch.compile failed here ({reason}); set train.compile=false")
