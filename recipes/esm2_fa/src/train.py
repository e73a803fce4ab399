"""ESM-2 masked-LM pretraining on token-budget shards: transformers' EsmForMaskedLM, a plain PyTorch loop (DDP).

    accelerate launch src/train.py --train_dir data/train --val_dir data/val
    torchrun --nproc_per_node=8 src/train.py --train_dir data/train --val_dir data/val training.max_steps=1000
    python src/train.py --config src/config_tiny_cpu.yaml --train_dir ... --val_dir ...   # one CPU process

Trailing `section.key=value` arguments override the YAML config. The same command serves the first run and every
requeue: `--resume_from_checkpoint auto` (the default; `latest` means the same) continues from the newest complete
`<output_dir>/checkpoints/step_N/`, including the position in the training data stream, or starts fresh; `none`
starts fresh (refused when checkpoints exist); a path resumes exactly that checkpoint. A finished run stays finished.
"""

from __future__ import annotations

# isort: off
import biorecipes_shared.stop_signals  # noqa: F401  (first: a SIGTERM during the imports below sets a flag)

# isort: on
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import EsmConfig
from transformers.integrations import is_tensorboard_available, is_wandb_available

from biorecipes_shared.distributed import (
    DistributedContext,
    all_reduce_mean,
    read_launch_env,
    seed_everything,
    setup_distributed,
    teardown_distributed,
)
from biorecipes_shared.logging_utils import MetricsWriter, ThroughputMeter, get_logger, plot_loss_curve
from biorecipes_shared.preemption import PreemptionHandler
from biorecipes_shared.run import RunLayout, finished_message, finished_run, mark_finished, resolve_resume, run_cli
from config import ConfigError, ModelConfig, RecipeConfig, load_config
from data_processing import PACKING_FILE, FastaError, read_packing
from dataset import DataDirError, ShardStream, check_data_fingerprints, check_shards, make_train_loader
from model import (
    ModelConfigError,
    build_model,
    check_attention_dropout,
    esm2_config,
    resolve_attention,
    weights_file,
)
from run_state import (  # noqa: F401  (export_final_model: a public name of the recipe)
    TensorBoardWriter,
    export_final_model,
    load_best_weights,
    restore,
    save,
    stream_layout,
)
from trainer import (  # noqa: F401  (esm2_lr_lambda, masked_lm_loss, fused_adamw_supported: the recipe's public names)
    MaskedLMLoss,
    Progress,
    Window,
    apply_speed_switches,
    esm2_lr_lambda,
    evaluate,
    fused_adamw_supported,
    make_optimizer,
    masked_lm_loss,
    metric_key,
    train_step,
)

log = get_logger("esm2_fa")
USER_ERRORS = (DataDirError, ModelConfigError, FastaError)


def check_report_to(report_to: str) -> None:
    """The logging integration must import now, not after the output dir exists."""
    available = {"none": True, "wandb": is_wandb_available(), "tensorboard": is_tensorboard_available()}
    if not available.get(report_to, False):
        raise ConfigError(
            f"training.report_to={report_to} needs the {report_to} package; install it or set training.report_to=none"
        )


def check_packing(data_dir: str | Path, what: str, model_cfg: ModelConfig) -> None:
    """Compare the shards' packing.json with the model section: batches must fit model.max_batch_size."""
    try:
        packing = read_packing(data_dir)
    except ValueError as err:
        raise DataDirError(str(err)) from err
    if packing is None:  # shards from before packing.json: nothing to compare, but say so
        log.warning(
            "%s dir %s has no %s; cannot check its token budget against model.max_batch_size",
            what,
            data_dir,
            PACKING_FILE,
        )
        return
    budget, longest = packing["token_budget"], packing["max_aa_length"] + 2
    if budget > model_cfg.max_batch_size:
        raise DataDirError(
            f"{what} dir {data_dir} was packed with a token budget of {budget} but model.max_batch_size is "
            f"{model_cfg.max_batch_size}; re-run data_processing.py with --token_budget {model_cfg.max_batch_size} "
            "or raise model.max_batch_size"
        )
    if longest > model_cfg.max_position_embeddings:
        raise DataDirError(
            f"{what} dir {data_dir} holds rows of up to {longest} tokens but model.max_position_embeddings is "
            f"{model_cfg.max_position_embeddings}; re-run data_processing.py with a smaller --max_aa_length"
        )


def check_inputs(cfg: RecipeConfig, device: torch.device) -> tuple[EsmConfig, str]:
    """Every check on user input that needs more than the config; runs before anything is written."""
    t, m = cfg.training, cfg.model
    output_dir = Path(t.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"training.output_dir {output_dir} exists and is not a directory")
    check_report_to(t.report_to)
    check_shards(cfg.data.val_dir, "val")
    check_packing(cfg.data.train_dir, "train", m)
    check_packing(cfg.data.val_dir, "val", m)
    check_data_fingerprints({"train": cfg.data.train_dir, "val": cfg.data.val_dir}, m)
    config = esm2_config(m.model_name, m.max_position_embeddings, m.hidden_dropout_prob, m.attention_probs_dropout_prob)
    backend = resolve_attention(m.attention)
    check_attention_dropout(config, backend, m.attention)
    if backend == "flex_attention" and device.type == "cpu":
        raise ConfigError("model.attention=flex_attention has no backward pass on CPU (torch 2.13): use sdpa")
    if t.mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("training.mixed_precision=fp16 needs a CUDA GPU: use bf16 or no on CPU")
    return config, backend


@dataclass
class Run:
    """What a run builds once: the bare model (checkpoints, export), what the loop calls, optimizer and outputs."""

    cfg: RecipeConfig
    layout: RunLayout
    ctx: DistributedContext
    model: torch.nn.Module
    wrapped: torch.nn.Module  # MaskedLMLoss around the model, under DDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    writer: MetricsWriter | None = None

    def save(self, progress: Progress, consumed: int, window: Window) -> Path:
        t = self.cfg.training
        layout = stream_layout(self.ctx.world_size, self.cfg.data.num_workers, t.seed)
        rank_state = {"batches_consumed": consumed, "window": window.as_dict()}
        return save(
            self.layout.checkpoints,
            self.model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            progress,
            rank_state,
            {"stream": layout},
            t.save_total_limit,
        )


def build(cfg: RecipeConfig, config: EsmConfig, backend: str, layout: RunLayout, ctx: DistributedContext) -> Run:
    """Model (the seed's initial weights, or model.model_name's published ones), speed switches, DDP, optimizer."""
    t = cfg.training
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
    return Run(cfg, layout, ctx, model, wrapped, optimizer, scheduler, scaler)


def over(cfg: RecipeConfig, progress: Progress) -> str | None:
    """Why the run has nothing left to do (max_steps, early stopping), or None."""
    t = cfg.training
    if progress.step >= t.max_steps:
        return "max_steps reached"
    if t.early_stopping.enabled and progress.patience_counter >= t.early_stopping.patience:
        return f"early stopping (no {t.metric_for_best_model} improvement)"
    return None


def log_window(run: Run, progress: Progress, window: Window, meter: ThroughputMeter, grad_norm: float) -> None:
    """One training line: mean loss over the window and ranks, LR, grad norm, real tokens/s, useful-token fraction."""
    loss = all_reduce_mean(window.loss_sum / max(window.steps, 1))
    rates = meter.rates()  # wall-clock rates of this process; the fraction comes from the (resumable) window
    rates["useful_token_fraction"] = window.tokens / max(window.positions, 1)
    lr = run.scheduler.get_last_lr()[0]
    run.writer.log(progress.step, loss=loss, learning_rate=lr, grad_norm=grad_norm, **rates)
    log.info(
        "step %d/%d  loss %.4f  lr %.2e  tokens/s %.0f  useful tokens %.3f",
        progress.step,
        run.cfg.training.max_steps,
        loss,
        lr,
        rates["tokens_per_s"],
        rates["useful_token_fraction"],
    )


def train_loop(run: Run, stream: ShardStream, progress: Progress, consumed: int, window: Window, resumed: bool) -> bool:
    """Step until the run is over (True) or a stop signal arrives (False); a checkpoint covers where it stopped."""
    t, ctx = run.cfg.training, run.ctx
    stream.start_batch = consumed  # batches this rank consumed before: skipped without reading
    batches, meter = iter(make_train_loader(stream, run.cfg.data.num_workers)), ThroughputMeter()
    saved_step = progress.step if resumed else None
    run.wrapped.train()
    with PreemptionHandler() as preemption:
        while True:
            stop = over(run.cfg, progress) is None and preemption.should_stop()  # checked before the first step too
            if over(run.cfg, progress) or stop:
                if saved_step != progress.step and progress.step > 0:
                    run.save(progress, consumed, window)
                return not stop
            micro = [next(batches) for _ in range(t.gradient_accumulation_steps)]
            loss, grad_norm = train_step(
                run.wrapped, micro, run.optimizer, run.scheduler, run.scaler, run.cfg, ctx.device
            )
            progress.step, consumed = progress.step + 1, consumed + len(micro)
            window.loss_sum, window.steps = window.loss_sum + loss, window.steps + 1
            for batch in micro:
                window.add(0.0, batch)
                meter.update(
                    samples=batch["input_ids"].size(0),
                    tokens=int(batch["attention_mask"].sum()),
                    positions=batch["attention_mask"].numel(),
                )
            if progress.step % t.logging_steps == 0:
                log_window(run, progress, window, meter, grad_norm)
                window = Window()
            if progress.step % t.eval_steps == 0:
                metrics = evaluate(run.wrapped, run.cfg, ctx.rank, ctx.world_size, ctx.device)
                run.writer.log(progress.step, **metrics)
                log.info("step %d  eval_loss %.4f", progress.step, metrics["eval_loss"])
                progress.record_evaluation(
                    metrics[metric_key(t.metric_for_best_model)], t.greater_is_better, t.early_stopping.threshold
                )
            if progress.step % t.save_steps == 0:
                run.save(progress, consumed, window)
                saved_step = progress.step


def finish(run: Run, progress: Progress) -> Path:
    """Export final_model/ (the best weights when asked), plot the loss, then mark the run finished."""
    t, layout = run.cfg.training, run.layout
    if t.load_best_model_at_end:
        load_best_weights(run.model, layout.checkpoints, progress.best_step)
    if run.ctx.is_main:
        export_final_model(run.model, layout.final_model)
        try:
            plot_loss_curve(layout.metrics, layout.loss_curve)
        except (OSError, ValueError) as err:  # e.g. max_steps < logging_steps: nothing to plot
            log.warning("no loss curve: %s", err)
    reason = over(run.cfg, progress)
    mark_finished(
        layout, progress.step, reason, early_stopped=reason.startswith("early"), best_metric=progress.best_metric
    )
    return layout.final_model


def writer_for(cfg: RecipeConfig, layout: RunLayout, ctx: DistributedContext, step: int) -> MetricsWriter:
    """metrics.jsonl (records after `step` dropped: they are logged again), plus wandb or TensorBoard when asked."""
    report_to = cfg.training.report_to
    if report_to == "tensorboard":
        return TensorBoardWriter(layout.output_dir, ctx, resume_step=step)
    wandb_args = {"project": "esm2_fa", "dir": str(layout.output_dir)} if report_to == "wandb" else None
    return MetricsWriter(layout.output_dir, ctx, wandb_init_args=wandb_args, resume_step=step)


def run(cfg: RecipeConfig, resume: str | None = "auto") -> Path | None:
    """Train according to cfg; returns the final export dir (None: nothing to do, or preempted after saving)."""
    layout = RunLayout(cfg.training.output_dir)
    record = finished_run(layout, cfg.training.max_steps)
    if record is not None:
        if read_launch_env()[0] == 0:
            print(finished_message(layout, record), flush=True)
        return None
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    config, backend = check_inputs(cfg, device)  # nothing is written before these pass
    rank, _, world_size = read_launch_env()
    t = cfg.training
    stream = ShardStream(cfg.data.train_dir, rank, world_size, cfg.data.num_workers, t.mlm_probability, t.seed)
    ctx = setup_distributed(seed=cfg.training.seed)
    get_logger("esm2_fa", ctx)  # now that the process group exists: INFO on rank 0 only
    checkpoint = resolve_resume(resume, layout.checkpoints)
    run_ = build(cfg, config, backend, layout, ctx)
    progress, consumed, window = Progress(), 0, Window()
    if checkpoint is not None:
        layout_now = stream_layout(world_size, cfg.data.num_workers, cfg.training.seed)
        progress, rank_state = restore(checkpoint, run_.model, run_.optimizer, run_.scheduler, run_.scaler, layout_now)
        consumed, window = rank_state["batches_consumed"], rank_state["window"]
        log.info("resuming from %s (step %d, data-stream batch %d per rank)", checkpoint, progress.step, consumed)
    with writer_for(cfg, layout, ctx, progress.step) as run_.writer:
        finished = train_loop(run_, stream, progress, consumed, window, resumed=checkpoint is not None)
    if not finished:
        if ctx.is_main and progress.step == 0:
            print("stopped by a signal before the first step: nothing to save; rerun the same command", flush=True)
        elif ctx.is_main:
            print(
                f"preempted at step {progress.step}: checkpoint saved in {layout.checkpoints}; "
                "rerun the same command to continue",
                flush=True,
            )
        return None
    final_dir = finish(run_, progress)
    if ctx.is_main:
        print(
            f"done at step {progress.step} (best {cfg.training.metric_for_best_model} {progress.best_metric}): "
            f"outputs in {layout.output_dir}: final_model/, checkpoints/, metrics.jsonl, loss_curve.png, "
            "run_finished.json",
            flush=True,
        )
    return final_dir


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The command line: the original's flags plus `section.key=value` overrides."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: src/config.yaml)")
    parser.add_argument("--train_dir", help="shards from data_processing.py (overrides data.train_dir)")
    parser.add_argument("--val_dir", help="validation shards (overrides data.val_dir)")
    parser.add_argument("--output_dir", help="checkpoints, metrics and final_model/ (overrides training.output_dir)")
    parser.add_argument(
        "--resume_from_checkpoint",
        default="auto",
        help="auto (default; `latest` = auto): newest complete checkpoint, else a fresh start; "
        "none: fresh start (refused if checkpoints exist); or a checkpoints/step_N dir",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=1000")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    overrides += [f"data.train_dir={args.train_dir}"] if args.train_dir else []
    overrides += [f"data.val_dir={args.val_dir}"] if args.val_dir else []
    overrides += [f"training.output_dir={args.output_dir}"] if args.output_dir else []
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: user, settings and write errors print one `error:` line and exit 1; preemption exits 0."""

    def train() -> None:
        args, overrides = parse_args(argv)
        run(load_config(args.config, overrides), args.resume_from_checkpoint)
        teardown_distributed()

    return run_cli(train, user_errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())  # run_cli ignores stop signals from its return on: a late one cannot make the exit code -15
