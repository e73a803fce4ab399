"""`Run`, what a training run builds once (settings, model, optimizer, LR schedule, data stream, the shared
`TrainingRun`, metrics writer, throughput meter), and `RunState`, what the loop advances and checkpoints save.

A checkpoint `checkpoints/step_N/` is the shared one (biorecipes_shared.TrainingRun): model.safetensors (the bare
EsmForMaskedLM's keys), training_state.pt (optimizer, LR schedule, grad scaler, and as `extra` the run's progress:
step, best metric, early stopping's patience, plus the data-stream layout), rank_R.pt per rank (RNG states, the
batches this rank consumed, its loss window) and manifest.json, written last. The newest `training.keep_last` are
kept, and the best one besides (load_best_model_at_end needs it).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import EsmConfig
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup  # 4.53 (faesm) has it only here

from biorecipes_shared import (
    CheckpointError,
    ConfigError,
    DistributedContext,
    MetricsWriter,
    ThroughputMeter,
    TrainingRun,
    get_logger,
    latest_checkpoint,
    read_launch_env,
    seed_everything,
    setup_distributed,
)
from config import RecipeConfig
from data import ShardStream, check_data_dirs
from model import (
    MaskedLMLoss,
    apply_speed_switches,
    build_model,
    check_attention_dropout,
    esm2_config,
    resolve_attention,
    weights_file,
)

log = logging.getLogger("esm2_fa")


@dataclass
class Window:
    """What the loss line averages since the last log (per rank; saved in checkpoints so a resume logs the same)."""

    loss_sum: float = 0.0
    steps: int = 0
    tokens: int = 0  # real (non-padding) tokens
    positions: int = 0  # token positions computed on (real + padding)
    samples: int = 0

    def add(self, loss: float, batches: list[dict[str, torch.Tensor]]) -> None:
        """One optimizer step: its loss and its micro-batches' attention masks ([B, L] each)."""
        self.loss_sum, self.steps = self.loss_sum + loss, self.steps + 1
        for batch in batches:
            self.tokens += int(batch["attention_mask"].sum())
            self.positions += batch["attention_mask"].numel()
            self.samples += batch["attention_mask"].size(0)


@dataclass
class RunState:
    """What the loop advances: the global progress (identical on every rank) and this rank's data position."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    patience_counter: int = 0
    evaluations: list = field(default_factory=list)
    consumed: int = 0  # batches this rank took from its data stream
    window: Window = field(default_factory=Window)

    PROGRESS = ("step", "best_metric", "best_step", "patience_counter", "evaluations")

    def progress(self) -> dict:
        """The global part, as checkpoints store it (training_state.pt `extra["progress"]`)."""
        return {name: getattr(self, name) for name in self.PROGRESS}

    def rank_state(self) -> dict:
        """This rank's part, as checkpoints store it (rank_R.pt `data_state`)."""
        return {"batches_consumed": self.consumed, "window": asdict(self.window)}

    def record_evaluation(self, metric: float, greater_is_better: bool, threshold: float) -> None:
        """Update the best value and early stopping's patience as HF's EarlyStoppingCallback does."""
        better = self.best_metric is None or (
            metric > self.best_metric if greater_is_better else metric < self.best_metric
        )
        if better and (self.best_metric is None or abs(metric - self.best_metric) > threshold):
            self.patience_counter = 0
        else:
            self.patience_counter += 1
        if better:
            self.best_metric, self.best_step = metric, self.step


@dataclass
class Run:
    """What a run builds once: the bare model (checkpoints, export), what the loop calls, optimizer and outputs."""

    cfg: RecipeConfig
    training: TrainingRun
    ctx: DistributedContext
    stream: ShardStream
    model: torch.nn.Module
    wrapped: torch.nn.Module  # MaskedLMLoss around the model, under DDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    writer: MetricsWriter | None = None
    meter: ThroughputMeter = field(default_factory=ThroughputMeter)

    @property
    def stream_layout(self) -> dict[str, int]:
        """What the data-stream position depends on: a resume must read the stream with the same layout."""
        num_workers = max(1, self.cfg.data.num_workers)
        return {"world_size": self.ctx.world_size, "num_workers": num_workers, "seed": self.cfg.training.seed}


def check_inputs(cfg: RecipeConfig, device: torch.device) -> tuple[EsmConfig, str]:
    """Every check on user input that needs more than the settings; runs before anything is written."""
    t, m = cfg.training, cfg.model
    output_dir = Path(t.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"training.output_dir {output_dir} exists and is not a directory")
    check_data_dirs(cfg)
    config = esm2_config(m.model_name, m.max_position_embeddings, m.hidden_dropout_prob, m.attention_probs_dropout_prob)
    backend = resolve_attention(m.attention)
    check_attention_dropout(config, backend, m.attention)
    if backend == "flex_attention" and device.type == "cpu":
        raise ConfigError("model.attention=flex_attention has no backward pass on CPU (torch 2.13): use sdpa")
    if t.mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("training.mixed_precision=fp16 needs a CUDA GPU: use bf16 or no on CPU")
    return config, backend


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether this torch has a fused AdamW kernel for the device."""
    try:
        param = torch.zeros(1, device=device, requires_grad=True)
        torch.optim.AdamW([param], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameters that get weight decay: everything but biases and LayerNorm weights (as HF's Trainer does)."""
    no_decay = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for name, _ in module.named_parameters(recurse=False)
    }
    return {n for n, _ in model.named_parameters() if n not in no_decay and not n.endswith("bias")}


def held_after(formula, end: int, step: int) -> float:
    """formula(step) up to `end`, then formula(end): the schedule stays at its floor after schedule_steps."""
    return formula(min(step, end))


def esm2_schedule(optimizer, warmup_steps: int, schedule_steps: int, floor: float = 0.1) -> LambdaLR:
    """The original's ESM-2 schedule: LR x (linear 0 -> 1 over warmup_steps, cosine 1 -> floor until
    schedule_steps, then flat floor). transformers' warmup + cosine-to-a-minimum formula, held at its floor after
    schedule_steps (past its end transformers' cosine would rise again)."""
    cosine = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, schedule_steps, min_lr_rate=floor)
    cosine.lr_lambdas[0] = partial(held_after, cosine.lr_lambdas[0], schedule_steps)
    return cosine


def make_optimizer(model: torch.nn.Module, cfg: RecipeConfig, device: torch.device):
    """(AdamW, esm2_schedule) over the trainable parameters of the bare model."""
    t, opt = cfg.training, cfg.training.optimizer
    decay = decay_parameter_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n in decay], "weight_decay": opt.weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]
    fused = fused_adamw_supported(device) if opt.fused is None else opt.fused
    optimizer = torch.optim.AdamW(
        groups, lr=t.learning_rate, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_epsilon, fused=fused
    )
    log.info("optimizer: AdamW (fused=%s)", fused)
    return optimizer, esm2_schedule(optimizer, t.warmup_steps, t.schedule_steps)


def new_training_run(cfg: RecipeConfig) -> TrainingRun:
    """The shared run object: the end step, checkpoint interval and resume choice are read here, once."""
    t = cfg.training
    return TrainingRun(
        t.output_dir, max_steps=t.max_steps, save_every=t.save_every, keep_last=t.keep_last, resume=t.resume,
        data_position="per_rank",
    )  # fmt: skip


def build_run(cfg: RecipeConfig, training: TrainingRun) -> Run:
    """Check the inputs, then the data stream, process group, model (the seed's initial weights, or
    model.model_name's published ones), speed switches, DDP and optimizer."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    config, backend = check_inputs(cfg, device)  # nothing is written before these pass
    t, (rank, _, world_size) = cfg.training, read_launch_env()
    stream = ShardStream(cfg.data.train_dir, rank, world_size, cfg.data.num_workers, t.mlm_probability, t.seed)
    ctx = setup_distributed(seed=t.seed)
    get_logger("esm2_fa", ctx)  # now that the process group exists: INFO on rank 0 only
    seed_everything(t.seed)  # identical initial weights on every rank
    model = build_model(config, backend, weights=weights_file(cfg.model.model_name)).to(ctx.device)
    seed_everything(t.seed + ctx.rank)  # then each rank its own dropout stream
    if getattr(model.esm, "contact_head", None) is not None:  # not used by MLM; frozen so DDP sees no unused grads
        model.esm.contact_head.requires_grad_(False)
    apply_speed_switches(model, t.activation_checkpointing, t.compile_scope if t.compile else None)
    wrapped = MaskedLMLoss(model)
    if ctx.is_distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=device_ids)
    optimizer, scheduler = make_optimizer(model, cfg, ctx.device)
    scaler = torch.amp.GradScaler("cuda") if t.mixed_precision == "fp16" else None
    return Run(cfg, training, ctx, stream, model, wrapped, optimizer, scheduler, scaler)


def restore(run: Run) -> RunState:
    """Register what checkpoints hold, then resume: the saved RunState, or a fresh one.

    Raises CheckpointError (one line) for a checkpoint that is missing, corrupt, tampered with, of another shape,
    or written with another world size or worker count.
    """
    state = RunState()
    run.training.register(
        run.model, run.optimizer, run.scheduler, run.scaler, data_state=state.rank_state,
        extra=lambda: {"progress": state.progress(), "stream": run.stream_layout},
        keep=lambda: [state.best_step] if state.best_step else [],  # load_best_model_at_end needs it at the end
    )  # fmt: skip
    try:
        saved = run.training.resume()
        if saved is None:
            return state
        for name in RunState.PROGRESS:
            setattr(state, name, saved.extra["progress"][name])
        state.consumed = int(saved.data_state["batches_consumed"])
        state.window = Window(**saved.data_state["window"])
        stream = saved.extra["stream"]
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a weights-only pickle of the wrong shape
        where = resume_path(run.training)
        raise CheckpointError(f"{where}: training state is not this recipe's ({type(err).__name__}: {err})") from err
    if stream["num_workers"] != run.stream_layout["num_workers"]:
        raise CheckpointError(
            f"{saved.path} was saved with data.num_workers={stream['num_workers']} and this run has "
            f"{run.stream_layout['num_workers']}: set data.num_workers={stream['num_workers']} to continue the same "
            "data stream"
        )
    log.info("resuming from %s (step %d, data-stream batch %d per rank)", saved.path, state.step, state.consumed)
    return state


def resume_path(training: TrainingRun) -> Path | None:
    """The checkpoint a resume read: the one asked for, else the newest complete one."""
    choice = str(training.resume_choice)
    if choice.lower() in ("auto", "latest", "true", "none", "false"):
        return latest_checkpoint(training.layout.checkpoints)
    return Path(choice)


class TensorBoardWriter(MetricsWriter):
    """metrics.jsonl plus the same scalars in `<output_dir>/tensorboard/` (rank 0; needs the tensorboard package)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._board = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter  # optional: only with report_to=tensorboard

            self._board = SummaryWriter(str(self.out_dir / "tensorboard"))

    def log(self, step: int, **metrics) -> None:
        super().log(step, **metrics)
        if self._board is not None:
            for key, value in metrics.items():
                self._board.add_scalar(key, value, step)

    def close(self) -> None:
        super().close()
        if self._board is not None:
            self._board.close()
            self._board = None


def open_writer(run: Run, state: RunState) -> MetricsWriter:
    """metrics.jsonl (records after `state.step` dropped: they are logged again), plus wandb or TensorBoard."""
    report_to, output_dir = run.cfg.training.report_to, run.training.layout.output_dir
    if report_to == "tensorboard":
        return TensorBoardWriter(output_dir, run.ctx, resume_step=state.step)
    wandb_args = {"project": "esm2_fa", "dir": str(output_dir)} if report_to == "wandb" else None
    return MetricsWriter(output_dir, run.ctx, wandb_init_args=wandb_args, resume_step=state.step)
