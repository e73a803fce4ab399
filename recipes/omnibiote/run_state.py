"""What one training run is made of (`Run`, built once by `build_run`) and what its loop advances (`RunState`).

The end of the run (`run.end`: the plan's last step, or --max_steps when that is smaller) is worked out once, in
`open_run`, and handed to the shared `TrainingRun`, which owns checkpoints, resume, stop signals and the finished
marker. The data position is global (sequences drawn over all ranks; see data.py), so another world size continues
exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from mup import MuAdamW
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from biorecipes_shared import (
    ConfigError,
    MetricsWriter,
    ThroughputMeter,
    TrainingRun,
    seed_everything,
)
from config import TrainConfig, check_world_size
from data import PackedMLMBatcher, check_fingerprint, draw_batch, load_split, parse_source_weights
from model import OmniBioTA, OmniBioTAConfig, mup_lr
from schedule import TrainingPlan, lr_schedule, plan_training
from tokenizer import OmniTokenizer

# Architecture fields a resumed (or --init_from) run must share with its source.
ARCHITECTURE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_embd")


@dataclasses.dataclass
class RunState:
    """What the loop advances: optimizer steps taken and sequences drawn over all ranks (the data position)."""

    step: int = 0
    samples_seen: int = 0
    resumed_from: Path | None = None

    def tokens_seen(self, ctx_len: int) -> int:
        return self.samples_seen * ctx_len


@dataclasses.dataclass
class Run:
    """Everything built once per run; `training` is the shared run contract (save, resume, finish)."""

    cfg: TrainConfig
    dist_ctx: Any
    plan: TrainingPlan
    training: TrainingRun
    log: Any
    tokenizer: OmniTokenizer
    model: OmniBioTA
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batcher: PackedMLMBatcher
    val_batches: list[dict[str, torch.Tensor]]
    metrics: MetricsWriter | None = None
    meter: ThroughputMeter = dataclasses.field(default_factory=ThroughputMeter)

    @property
    def end(self) -> int:
        """The step the run ends at (computed once, in `open_run`)."""
        return self.training.max_steps

    def extra(self) -> dict:
        """What a checkpoint records beside the weights, for the checks of `restore`."""
        return {"config": self.model.config.to_dict(), "plan": self.cfg.plan_settings()}

    def autocast(self):
        # bf16 autocast on GPU; the rotary tables stay fp32 (the original's model.to(bfloat16) corrupted them)
        if self.dist_ctx.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def open_run(cfg: TrainConfig) -> tuple[TrainingPlan, TrainingRun]:
    """The step plan (global mini-batches: the same for every world size) and the run contract, which knows the end
    step; pure arithmetic, so a finished run is recognised before anything is built."""
    plan = plan_training(int(cfg.token_budget), cfg.batch_size, cfg.mini_batch_size, 1, cfg.ctx_len,
                         cfg.ramp_fraction, cfg.warmup_fraction)  # fmt: skip
    end = plan.total_steps if cfg.max_steps is None else min(plan.total_steps, cfg.max_steps)
    return plan, TrainingRun(cfg.output_dir, max_steps=end, keep_last=cfg.keep_last, resume=cfg.resume)


def open_data(cfg: TrainConfig, tokenizer: OmniTokenizer) -> tuple[dict, dict, dict, dict]:
    """Train/val sources and their sampling weights; ConfigError/DataError for data that cannot train this model."""
    train_sources, val_sources = load_split(cfg.base_dir, "train"), load_split(cfg.base_dir, "val")
    check_fingerprint([*train_sources.values(), *val_sources.values()], tokenizer)
    train_weights = parse_source_weights(cfg.source_weights, train_sources)
    val_weights = {name: weight for name, weight in train_weights.items() if name in val_sources}
    if not any(val_weights.values()):
        raise ConfigError(
            f"{Path(cfg.base_dir) / 'val'}: none of the training sources {sorted(train_weights)} has a val split"
        )
    used = [train_sources[n] for n, w in train_weights.items() if w > 0]
    used += [val_sources[n] for n, w in val_weights.items() if w > 0]
    # a window longer than a source's whole array would be mostly padding, and an absurd --ctx_len's attention mask
    # (ctx_len x ctx_len) takes tens of GB before the first step
    smallest = min(used, key=lambda source: source.n_tokens)
    if cfg.ctx_len > smallest.n_tokens:
        raise ConfigError(
            f"--ctx_len {cfg.ctx_len} is longer than all {smallest.n_tokens} tokens of {smallest.folder};"
            " lower --ctx_len or add data to that source"
        )
    return train_sources, train_weights, val_sources, val_weights


def model_config(cfg: TrainConfig, tokenizer: OmniTokenizer) -> OmniBioTAConfig:
    try:
        return OmniBioTAConfig(
            vocab_size=tokenizer.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
            ctx_len=cfg.ctx_len, dropout=cfg.dropout, pad_id=tokenizer.pad_id,
            attn_impl="math" if cfg.disable_flash else "auto",
        )  # fmt: skip
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_optimizer(model: OmniBioTA, cfg: TrainConfig) -> torch.optim.Optimizer:
    """MuAdamW; weight decay on matrices only (norm gains are not decayed)."""
    lr = cfg.lr if cfg.force_lr else mup_lr(cfg.lr, cfg.batch_size)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return MuAdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.epsilon)


def check_same(saved: dict, current: dict, source: Path, fields, hint: str) -> None:
    """A checkpoint or export continues only a run with the same settings in `fields`: one line naming the first."""
    for field in fields:
        if field in saved and saved[field] != current[field]:
            raise ConfigError(f"{source}: was trained with {field}={saved[field]}, not {current[field]}; {hint}")


def init_weights_from(model: OmniBioTA, source: Path) -> None:
    """Start a fresh run from an exported (or converted) final_model/ of the same architecture."""
    saved = json.loads((Path(source) / "config.json").read_text())
    check_same(saved, model.config.to_dict(), source, (*ARCHITECTURE_FIELDS, "pad_id"), "give flags that match it")
    model.load_state_dict(load_file(Path(source) / "model.safetensors"), strict=True)


def restore(run: Run) -> RunState:
    """Register the run's parts with the run contract and resume (newest valid checkpoint, --resume path, or
    --init_from / fresh weights); ConfigError when the checkpoint belongs to other settings."""
    state = RunState()
    run.training.register(
        run.model, run.optimizer, run.scheduler,
        data_state=lambda: {"samples_seen": state.samples_seen}, extra=run.extra,
    )  # fmt: skip
    resumed = run.training.resume()  # weights of another architecture: one CheckpointError line naming them
    if resumed is None:
        if run.cfg.init_from is not None:
            init_weights_from(run.model, run.cfg.init_from)
            run.log.info("initial weights from %s", run.cfg.init_from)
        return state
    hint = "use another output_dir (--save_name) or the same settings"
    check_same(resumed.extra.get("config", {}), run.model.config.to_dict(), resumed.path,
               (*ARCHITECTURE_FIELDS, "ctx_len"), hint)  # fmt: skip
    plan = run.cfg.plan_settings()
    check_same(resumed.extra.get("plan", {}), plan, resumed.path, tuple(plan), hint)
    state.step, state.samples_seen = resumed.step, int(resumed.data_state["samples_seen"])
    state.resumed_from = resumed.path
    run.log.info("resumed from %s at step %d (%d sequences)", resumed.path, state.step, state.samples_seen)
    return state


def build_run(cfg: TrainConfig, dist_ctx, plan: TrainingPlan, training: TrainingRun, log) -> tuple[Run, RunState]:
    """Data, model, optimizer, schedule and the run state (resumed, --init_from or fresh); writes nothing but the
    run folder's lock."""
    if cfg.wandb_project_name and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb_project_name needs the wandb package: pip install wandb")
    if not Path(cfg.base_dir).is_dir():
        raise ConfigError(f"--base_dir {cfg.base_dir}: no such folder")
    check_world_size(cfg, dist_ctx.world_size)
    tokenizer = OmniTokenizer(cfg.tokenizer_file)
    train_sources, train_weights, val_sources, val_weights = open_data(cfg, tokenizer)
    arch = model_config(cfg, tokenizer)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = OmniBioTA(arch).to(dist_ctx.device)
    seed_everything(cfg.seed + dist_ctx.rank)  # but a different dropout stream per rank
    optimizer = build_optimizer(model, cfg)
    batcher = PackedMLMBatcher(train_sources, train_weights, cfg.ctx_len, cfg.mini_batch_size, tokenizer, None)
    val_batcher = PackedMLMBatcher(val_sources, val_weights, cfg.ctx_len, cfg.mini_batch_size, tokenizer, None)
    world, rank = dist_ctx.world_size, dist_ctx.rank
    val_batches = [draw_batch(val_batcher, 0, "val", j) for j in range(rank, cfg.val_batches * world, world)]
    run = Run(cfg, dist_ctx, plan, training, log, tokenizer, model, model, optimizer, lr_schedule(optimizer, plan),
              batcher, val_batches)  # fmt: skip
    state = restore(run)
    # after loading: compiled and eager runs share state-dict keys, so either reads the other's checkpoints
    model.enable_speedups(compile_blocks=cfg.compile, activation_checkpointing=cfg.activation_checkpointing)
    if dist_ctx.is_distributed:
        run.ddp_model = DistributedDataParallel(model)
    return run, state
