"""Train OmniBioTA with masked-language modelling on encoded DNA/RNA/protein tokens (flags: config.py).

    torchrun --nproc_per_node=4 train_encoder.py --base_dir data/encoded --save_name omni_small ...

The loop: set up → run state (run_state.py) → train_step → log → validate → checkpoint → finish. The same command
serves the first run and every requeue: it resumes from the newest valid checkpoint, and a finished run exits 0.
"""

from __future__ import annotations

# isort: off
import biorecipes_shared.stop_signals  # noqa: F401  (first: a SIGTERM during the imports below sets a flag)

# isort: on
import contextlib
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
from mup import MuAdamW
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from biorecipes_shared.distributed import all_reduce_mean, seed_everything, setup_distributed, teardown_distributed
from biorecipes_shared.files import WriteError, describe_write_error
from biorecipes_shared.logging_utils import MetricsWriter, ThroughputMeter, get_logger, peak_memory, plot_loss_curve
from biorecipes_shared.preemption import PreemptionHandler
from biorecipes_shared.run import ConfigError, finished_message, finished_run, mark_finished, resolve_resume, run_cli
from config import TrainConfig, check_world_size, parse_config
from data import PackedMLMBatcher, check_fingerprint, load_split, parse_source_weights
from errors import OmniBioteError
from export import export_final_model
from model import OmniBioTA, OmniBioTAConfig, mup_lr
from run_state import ARCHITECTURE_FIELDS, RunState, check_same, draw_batch, load_run, micro_batches, save_run
from schedule import TrainingPlan, lr_multiplier, plan_training
from tokenizer import OmniTokenizer


def make_plan(config: TrainConfig) -> TrainingPlan:
    """The step plan of the whole run in global mini-batches: the same for every world size (see run_state.py)."""
    return plan_training(
        int(config.token_budget),
        config.batch_size,
        config.mini_batch_size,
        1,
        config.ctx_len,
        config.ramp_fraction,
        config.warmup_fraction,
    )


def last_step(config: TrainConfig, plan: TrainingPlan) -> int:
    return plan.total_steps if config.max_steps is None else min(plan.total_steps, config.max_steps)


def open_data(config: TrainConfig, tokenizer: OmniTokenizer) -> tuple[dict, dict, dict, dict]:
    """Train/val sources and their sampling weights; ConfigError/DataError for data that cannot train this model."""
    train_sources, val_sources = load_split(config.base_dir, "train"), load_split(config.base_dir, "val")
    check_fingerprint([*train_sources.values(), *val_sources.values()], tokenizer)
    train_weights = parse_source_weights(config.source_weights, train_sources)
    val_weights = {name: weight for name, weight in train_weights.items() if name in val_sources}
    if not any(val_weights.values()):
        raise ConfigError(
            f"{Path(config.base_dir) / 'val'}: none of the training sources {sorted(train_weights)} has a val split"
        )
    used = [train_sources[n] for n, w in train_weights.items() if w > 0]
    used += [val_sources[n] for n, w in val_weights.items() if w > 0]
    # a window longer than a source's whole array would be mostly padding, and an absurd --ctx_len's attention mask
    # (ctx_len x ctx_len) takes tens of GB before the first step
    smallest = min(used, key=lambda source: source.n_tokens)
    if config.ctx_len > smallest.n_tokens:
        raise ConfigError(
            f"--ctx_len {config.ctx_len} is longer than all {smallest.n_tokens} tokens of {smallest.folder};"
            " lower --ctx_len or add data to that source"
        )
    return train_sources, train_weights, val_sources, val_weights


def model_config(config: TrainConfig, tokenizer: OmniTokenizer) -> OmniBioTAConfig:
    return OmniBioTAConfig(
        vocab_size=tokenizer.vocab_size,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        ctx_len=config.ctx_len,
        dropout=config.dropout,
        pad_id=tokenizer.pad_id,
        attn_impl="math" if config.disable_flash else "auto",
    )


def build_optimizer(model: OmniBioTA, config: TrainConfig) -> torch.optim.Optimizer:
    """MuAdamW; weight decay on matrices only (norm gains are not decayed)."""
    lr = config.lr if config.force_lr else mup_lr(config.lr, config.batch_size)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return MuAdamW(groups, lr=lr, betas=(config.beta1, config.beta2), eps=config.epsilon)


def init_weights_from(model: OmniBioTA, source: Path) -> None:
    """Start a fresh run from an exported (or converted) final_model/ of the same architecture."""
    saved = json.loads((Path(source) / "config.json").read_text())
    current = model.config.to_dict()
    check_same(saved, current, source, (*ARCHITECTURE_FIELDS, "pad_id"), "give flags that match it")
    model.load_state_dict(load_file(Path(source) / "model.safetensors"), strict=True)


@dataclasses.dataclass
class Training:
    """Everything the loop touches; built once by `set_up`."""

    config: TrainConfig
    dist_ctx: Any
    plan: TrainingPlan
    tokenizer: OmniTokenizer
    model: OmniBioTA
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batcher: PackedMLMBatcher
    val_batches: list
    state: RunState
    log: Any
    metrics: MetricsWriter | None = None

    @property
    def extra(self) -> dict:
        return {"config": self.model.config.to_dict(), "plan": self.config.plan_settings()}

    def autocast(self):
        # bf16 autocast on GPU; the rotary tables stay fp32 (the original's model.to(bfloat16) corrupted them)
        if self.dist_ctx.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def checkpoint(self) -> None:
        save_run(
            self.config.layout.checkpoints,
            self.state,
            self.model,
            self.optimizer,
            self.scheduler,
            self.extra,
            self.config.keep_last_k,
        )


def set_up(config: TrainConfig, dist_ctx, plan: TrainingPlan, log) -> Training:
    """Data, model, optimizer and the run state (resumed, --init_from or fresh); writes nothing."""
    check_world_size(config, dist_ctx.world_size)
    tokenizer = OmniTokenizer(config.tokenizer_file)
    train_sources, train_weights, val_sources, val_weights = open_data(config, tokenizer)
    try:
        arch = model_config(config, tokenizer)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    seed_everything(config.seed)  # identical initial weights on every rank
    model = OmniBioTA(arch).to(dist_ctx.device)
    seed_everything(config.seed + dist_ctx.rank)  # but a different dropout stream per rank
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(plan))
    batcher = PackedMLMBatcher(train_sources, train_weights, config.ctx_len, config.mini_batch_size, tokenizer, None)
    val_batcher = PackedMLMBatcher(val_sources, val_weights, config.ctx_len, config.mini_batch_size, tokenizer, None)
    world, rank = dist_ctx.world_size, dist_ctx.rank
    val_batches = [draw_batch(val_batcher, 0, "val", j) for j in range(rank, config.val_batches * world, world)]
    resume_from = resolve_resume(config.resume, config.layout.checkpoints)
    if resume_from is not None:
        state = load_run(resume_from, model, optimizer, scheduler, arch.to_dict(), config.plan_settings())
        log.info("resumed from %s at step %d (%d sequences)", resume_from, state.step, state.samples_seen)
    else:
        state = RunState()
        if config.init_from is not None:
            init_weights_from(model, config.init_from)
            log.info("initial weights from %s", config.init_from)
    # after loading: compiled and eager runs share state-dict keys, so either reads the other's checkpoints
    model.enable_speedups(compile_blocks=config.compile, activation_checkpointing=config.activation_checkpointing)
    ddp_model = DistributedDataParallel(model) if dist_ctx.is_distributed else model
    return Training(
        config, dist_ctx, plan, tokenizer, model, ddp_model, optimizer, scheduler, batcher, val_batches, state, log
    )


def train_step(run: Training, meter: ThroughputMeter) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this step's global mini-batches (this rank's share); returns (loss, grad norm).

    The meter counts this rank's real tokens (not padding, not the weight-0 stand-ins of the batch ramp) and every
    position the model computed on."""
    config, device = run.config, run.dist_ctx.device
    units = run.plan.accumulation(run.state.step)
    first_unit = run.state.samples_seen // config.mini_batch_size
    micros = micro_batches(units, run.dist_ctx.world_size, run.dist_ctx.rank, first_unit)
    step_loss = torch.zeros((), device=device)
    for number, (unit, weight) in enumerate(micros):
        batch = draw_batch(run.batcher, config.seed, "train", unit)
        real = int((batch["doc_ids"] >= 0).sum()) if weight > 0 else 0  # on the CPU copy: no device sync
        meter.update(
            samples=config.mini_batch_size if weight > 0 else 0, tokens=real, positions=batch["doc_ids"].numel()
        )
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # gradients are all-reduced only on the last micro-batch of a step
        sync = number == len(micros) - 1 or not run.dist_ctx.is_distributed
        with contextlib.nullcontext() if sync else run.ddp_model.no_sync(), run.autocast():
            loss = run.ddp_model(**batch) * weight
        loss.backward()
        step_loss += loss.detach()  # no GPU sync per micro-batch; read at log steps only
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip or float("inf"))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    run.state.samples_seen += units * config.mini_batch_size
    return step_loss, grad_norm


@torch.no_grad()
def validation_loss(run: Training) -> float:
    """Mean MLM loss over the fixed validation batches, averaged over ranks."""
    run.model.eval()
    losses = []
    for batch in run.val_batches:
        with run.autocast():
            losses.append(float(run.model(**{k: v.to(run.dist_ctx.device) for k, v in batch.items()})))
    run.model.train()
    return float(all_reduce_mean(sum(losses) / len(losses)))


def crossed(freq: float, before: int, after: int) -> bool:
    """True when a multiple of freq tokens lies in (before, after]: time to validate or save."""
    return freq > 0 and int(after // freq) > int(before // freq)


def after_step(run: Training, loss, grad_norm, tokens_before: int, meter: ThroughputMeter) -> None:
    """Log, validate and checkpoint as the step counts and token frequencies say."""
    config, state, plan = run.config, run.state, run.plan
    tokens = state.tokens_seen(config.ctx_len)
    if state.step % config.log_freq == 0 or state.step == last_step(config, plan):
        loss_value = float(all_reduce_mean(loss.item()))
        lr = run.scheduler.get_last_lr()[0]
        rates = {**meter.rates(), **peak_memory()}
        run.metrics.log(state.step, tokens=tokens, loss=loss_value, lr=lr, grad_norm=float(grad_norm), **rates)
        run.log.info(
            "step %d/%d  tokens %d  loss %.4f  %.0f tokens/s  useful %.3f",
            state.step,
            plan.total_steps,
            tokens,
            loss_value,
            rates["tokens_per_s"],
            rates["useful_token_fraction"],
        )
    if crossed(config.test_freq, tokens_before, tokens) or state.step == plan.total_steps:
        val_loss = validation_loss(run)
        run.metrics.log(state.step, tokens=tokens, val_loss=val_loss)
        run.log.info("step %d  val_loss %.4f", state.step, val_loss)
    if crossed(config.save_freq, tokens_before, tokens):
        run.checkpoint()


def train_loop(run: Training, preemption: PreemptionHandler) -> bool:
    """Steps until the last one or a stop signal (checked before every step, the first included, so a signal
    during set-up stops cleanly); True when the run reached its last step."""
    config, state = run.config, run.state
    end = last_step(config, run.plan)
    meter = ThroughputMeter()
    while state.step < end:
        if preemption.should_stop():
            run.log.info("preempted at step %d", state.step)
            break
        tokens_before = state.tokens_seen(config.ctx_len)
        loss, grad_norm = train_step(run, meter)
        after_step(run, loss, grad_norm, tokens_before, meter)
    if state.step > 0:  # a fresh run stopped before its first step has nothing to save
        run.checkpoint()
    return state.step >= end


def open_metrics(run: Training) -> None:
    """The run folder's metrics files; a fresh start logs the validation loss of the initial weights first."""
    config = run.config
    # the first validation runs before the run folder exists: a run that cannot even do that leaves nothing
    initial_val_loss = validation_loss(run) if run.state.step == 0 else None
    wandb_args = {"project": config.wandb_project_name, "name": config.save_name} if config.wandb_project_name else None
    run.metrics = MetricsWriter(
        config.layout.output_dir,
        run.dist_ctx,
        tsv_files={"log_file.txt": ["step", "tokens", "loss"]},
        wandb_init_args=wandb_args,
        resume_step=run.state.step if run.state.resumed_from is not None else -1,  # fresh: drop a killed run's lines
    )
    if initial_val_loss is not None:
        run.metrics.log(0, tokens=0, val_loss=initial_val_loss)


def write_loss_curve(layout) -> None:
    """loss_curve.png (temp name, then renamed); a write failure is one WriteError line."""
    try:
        plot_loss_curve(layout.metrics, layout.loss_curve)
    except OSError as err:
        layout.loss_curve.with_name(f".tmp-{layout.loss_curve.name}").unlink(missing_ok=True)
        raise WriteError(describe_write_error(err, layout.loss_curve)) from err


def finish(run: Training, reached_end: bool) -> None:
    """Export final_model/, plot, and mark the run finished; or say how to continue a preempted run."""
    config, layout, state = run.config, run.config.layout, run.state
    if not reached_end:
        run.log.info("stopped at step %d of %d; rerun the same command to continue", state.step, run.plan.total_steps)
        return
    if run.dist_ctx.is_main:
        export_final_model(run.model, run.tokenizer.model_file, layout.final_model)
        write_loss_curve(layout)
        reason = "token budget reached" if state.step >= run.plan.total_steps else "--max_steps reached"
        mark_finished(layout, state.step, reason, tokens=state.tokens_seen(config.ctx_len))
        run.log.info("outputs in %s: final_model/, metrics.jsonl, log_file.txt, loss_curve.png", layout.output_dir)


def train(config: TrainConfig, dist_ctx) -> Path | None:
    """The training run; returns the final_model/ folder (None when preempted: rerun to continue)."""
    log = get_logger("omnibiote", dist_ctx)
    plan = make_plan(config)
    if done := finished_run(config.layout, target_step=last_step(config, plan)):
        if dist_ctx.is_main:  # one line, not one per rank
            print(finished_message(config.layout, done), flush=True)
        return config.layout.final_model
    if config.wandb_project_name and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb_project_name needs the wandb package: pip install wandb")
    if not Path(config.base_dir).is_dir():
        raise ConfigError(f"--base_dir {config.base_dir}: no such folder")
    run = set_up(config, dist_ctx, plan, log)
    log.info(
        "model %.2fM parameters; %d steps (ramp %d, warmup %d), %d mini-batches of %d per step over %d rank(s)",
        run.model.num_parameters() / 1e6,
        plan.total_steps,
        plan.ramp_steps,
        plan.warmup_steps,
        plan.full_accumulation,
        config.mini_batch_size,
        dist_ctx.world_size,
    )
    with PreemptionHandler() as preemption:
        if preemption.should_stop():  # signalled during imports or set-up: stop before writing anything
            log.info("stopped before the first step; rerun the same command to continue")
            return None
        open_metrics(run)
        try:
            reached_end = train_loop(run, preemption)
        finally:
            run.metrics.close()
    finish(run, reached_end)
    return config.layout.final_model if reached_end else None


def main(argv=None) -> None:
    config = parse_config(argv)  # every flag check, before anything is created
    dist_ctx = setup_distributed(seed=config.seed)
    try:
        train(config, dist_ctx)
    finally:
        teardown_distributed()


if __name__ == "__main__":
    # run_cli ignores stop signals from its return on: a late one cannot make the exit code -15
    sys.exit(run_cli(main, user_errors=(OmniBioteError,)))
