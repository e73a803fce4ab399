"""Pretrain Geneformer with masked-LM on tokenized cells.

    python train.py                                         # l0_sanity on the bundled sample, CPU friendly
    torchrun --nproc_per_node=8 train.py --config-name 106m data.train_path=... data.vocab_path=...
    python train.py --config-name 4b --cfg job              # print the composed config
    python train.py model.init_from=/models/Geneformer-V1-10M data.vocab_path=...   # start from published weights

One command for the first run and every requeue: the same command resumes from the newest valid checkpoint, a
finished run exits 0 without training, SIGTERM/SIGUSR1 save and exit 0. Outputs, all under training.output_dir:
checkpoints/step_N/, final_model/ (safetensors + config.json, Hugging Face BERT layout), metrics.jsonl, loss.tsv,
loss_curve.png, run_finished.json. DDP by default, FSDP2 with training.use_fsdp=true.
"""

from __future__ import annotations

# isort: off
import biorecipes_shared.stop_signals  # noqa: F401  (first: a SIGTERM during the imports below sets a flag)

# isort: on
import contextlib
import math
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import sweep
from biorecipes_shared.checkpoint import export_safetensors, save_checkpoint, unwrap_model
from biorecipes_shared.distributed import all_reduce_mean, read_launch_env, teardown_distributed
from biorecipes_shared.files import atomic_write
from biorecipes_shared.fsdp_checkpoint import gather_full_state_dict
from biorecipes_shared.logging_utils import MetricsWriter, ThroughputMeter, get_logger, peak_memory, plot_loss_curve
from biorecipes_shared.preemption import PreemptionHandler
from biorecipes_shared.run import RunLayout, finished_message, finished_run, mark_finished, run_cli
from config import LR_SCHEDULES, check_config, config_from_argv, recipe_path
from data import batch_cells, batch_token_counts, iterate_batches
from fp8 import fp8_autocast
from model import BertForMaskedLM, te_to_hf_state_dict
from preprocess import DataError
from run_state import Run, RunState, make_optimizer, restore, set_up, shard_model

__all__ = ["LR_SCHEDULES", "check_config", "main", "make_optimizer", "shard_model", "train"]

USER_ERRORS = (
    DataError,
    FloatingPointError,
)  # ConfigError, CheckpointError and write errors are caught by run_cli itself


def precision_context(cfg: DictConfig, device: torch.device):
    """bf16 autocast (if asked), and inside it the FP8 context of the backend (fp8.py; validated by check_config)."""
    stack = contextlib.ExitStack()
    if cfg.training.bf16:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
    stack.enter_context(fp8_autocast(cfg))
    return stack


def train_step(run: Run, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on this rank's micro-batch; returns (loss, grad norm) before the update, detached."""
    batch = {key: value.to(run.dist_ctx.device, non_blocking=True) for key, value in batch.items()}
    with precision_context(run.cfg, run.dist_ctx.device):
        loss = run.wrapped(**batch, masked_logits_only=True).loss
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.wrapped.parameters(), run.cfg.training.grad_clip_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


def log_step(run: Run, state: RunState, loss: torch.Tensor, grad_norm, meter, metrics: MetricsWriter) -> None:
    """Mean loss over ranks into metrics.jsonl / loss.tsv and the console; a non-finite loss stops the run."""
    mean_loss = all_reduce_mean(loss.float()).item()
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    state.losses.append(mean_loss)
    rates, lr = meter.rates(), run.scheduler.get_last_lr()[0]
    epoch = state.position["epoch"]
    metrics.log(state.step, loss=mean_loss, lr=lr, grad_norm=float(grad_norm), epoch=epoch, **rates, **peak_memory())
    run.log.info(
        f"step {state.step}/{run.cfg.training.num_train_steps}  loss {mean_loss:.4f}  lr {lr:.2e}  "
        f"{rates['tokens_per_s']:.0f} tokens/s  useful {rates['useful_token_fraction']:.2f}"
    )
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"loss became {mean_loss} at step {state.step}")


def save(run: Run, state: RunState) -> None:
    """A complete checkpoint of `state` (every rank calls it); the data position is global, the same on all ranks."""
    save_checkpoint(
        run.layout.checkpoints,
        state.step,
        run.wrapped,
        run.optimizer,
        run.scheduler,
        data_state=state.position,
        generators=run.generators,
        extra={"data_position": dict(state.position), "world_size": run.dist_ctx.world_size},
        keep_last_k=run.cfg.training.keep_last_k,
        sharded=run.cfg.training.use_fsdp,
    )


def train_loop(run: Run, state: RunState, metrics: MetricsWriter) -> None:
    """Step until num_train_steps or a preemption signal (then save and stop), checkpointing as configured."""
    training = run.cfg.training
    batches = iterate_batches(
        run.dataset,
        run.collator,
        run.cfg.data.micro_batch_size,
        training.seed,
        run.dist_ctx.rank,
        run.dist_ctx.world_size,
        state.position,
        batching=run.cfg.data.batching,
    )
    meter = ThroughputMeter()
    run.wrapped.train()
    with PreemptionHandler() as preemption:
        if preemption.should_stop():  # signalled during imports or set-up: the last saved state stands
            state.preempted = True
            run.log.warning(
                f"{preemption.signal_name()} before step {state.step + 1}: stopped; rerun the same command to continue"
            )
            return
        while state.step < training.num_train_steps:
            state.position, batch = next(batches)
            loss, grad_norm = train_step(run, batch)
            state.step += 1
            tokens, positions = batch_token_counts(batch)
            meter.update(samples=batch_cells(batch), tokens=tokens, positions=positions)
            last = state.step == training.num_train_steps
            if state.step % training.log_every_n_steps == 0 or last:
                log_step(run, state, loss, grad_norm, meter, metrics)
            state.preempted = preemption.should_stop()
            if state.step % training.save_every_n_steps == 0 or last or state.preempted:
                save(run, state)
            if state.preempted:
                run.log.warning(f"preempted: saved step {state.step}; rerun the same command to resume")
                return


def export_final_model(model: BertForMaskedLM, state_dict: dict, out_dir) -> None:
    """final_model/: model.safetensors + config.json in the Hugging Face BERT layout (atomic); vocab.txt follows."""
    if getattr(model.config, "use_te_layers", False):
        state_dict = te_to_hf_state_dict(state_dict)
    config = model.config.to_dict()
    config["architectures"] = ["BertForMaskedLM"]
    out_dir = Path(out_dir)
    export_safetensors(None, config, out_dir, state_dict=state_dict)


def finish(run: Run, state: RunState) -> None:
    """Export final_model/, plot the loss curve, then mark the run finished (a rerun is a no-op from here on)."""
    sharded = run.cfg.training.use_fsdp
    full_state = gather_full_state_dict(run.wrapped) if sharded else unwrap_model(run.wrapped).state_dict()
    if run.dist_ctx.is_main:
        export_final_model(run.model, full_state, run.layout.final_model)
        with atomic_write(run.layout.final_model / "vocab.txt") as handle:  # lets embed.py / init_from check tokens
            handle.write("\n".join(run.vocab) + "\n")
        if run.layout.metrics.is_file():
            plot_loss_curve(run.layout.metrics, run.layout.loss_curve)  # atomic; WriteError on failure
        mark_finished(run.layout, state.step, "max steps reached")
        run.log.info(
            f"done: final model {run.layout.final_model}, metrics {run.layout.metrics}, loss curve "
            f"{run.layout.loss_curve}, checkpoints {run.layout.checkpoints}"
        )


def train(cfg: DictConfig, logger_factory=get_logger) -> list[float]:
    """Run, resume or (when already finished) skip training as configured; returns the losses this call logged.

    Raises ConfigError / DataError / CheckpointError / WriteError (one line each) before any output for bad input."""
    check_config(cfg)
    layout = RunLayout(recipe_path(cfg.training.output_dir))
    record = finished_run(layout, cfg.training.num_train_steps)
    if record is not None:
        if read_launch_env()[0] == 0:
            print(finished_message(layout, record), flush=True)
        return []
    run = set_up(cfg, layout, logger_factory)
    state = restore(run)
    wandb_args = OmegaConf.to_container(cfg.training.wandb_init_args) if cfg.training.wandb_init_args else None
    tsv = {"loss.tsv": ["step", "loss"]}
    with MetricsWriter(
        layout.output_dir, run.dist_ctx, tsv_files=tsv, wandb_init_args=wandb_args, resume_step=state.step
    ) as metrics:
        train_loop(run, state, metrics)
    if not state.preempted:
        finish(run, state)
    teardown_distributed()
    return state.losses


def run_sweep(argv: list[str]) -> None:
    """Every job of a `-m` sweep in its own run folder (sweep.py); a job stopped by a signal ends the sweep."""
    show, configs = sweep.sweep_configs(argv)
    if show is not None:
        sweep.print_configs(configs, show)
        return
    for number, (job, cfg) in enumerate(configs):
        print(f"sweep job {number}/{len(configs)}: {' '.join(job)} -> {cfg.training.output_dir}", file=sys.stderr)
        train(cfg)
        if finished_run(RunLayout(recipe_path(cfg.training.output_dir)), cfg.training.num_train_steps) is None:
            print(f"sweep stopped at job {number}: rerun the same command to continue", file=sys.stderr)
            return


def main(argv: list[str] | None = None) -> int:
    """The command line: one `error: …` line and exit 1 for bad input, settings or a failed write."""

    def entry() -> None:
        args = sys.argv[1:] if argv is None else list(argv)
        if sweep.is_sweep(args):
            run_sweep(args)
            return
        cfg = config_from_argv(args)
        if cfg is not None:
            train(cfg)

    return run_cli(entry, user_errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())  # run_cli ignores stop signals from its return on: a late one cannot make the exit code -15
