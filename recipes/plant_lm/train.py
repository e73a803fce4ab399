"""Train the plant DNA language model: `python train.py --config configs/sample.yaml` or under torchrun / srun.

Every field of `config.Config` is a flag of the same name (`--batch_size 16`), a YAML key of `--config FILE` and a
`batch_size=16` override. The run follows the biorecipes run contract through the shared `TrainingRun`: the same
command starts, resumes (newest valid `<output_dir>/checkpoints/step_N/`) and, once finished, does nothing;
SIGTERM/SIGUSR1 save a checkpoint and exit 0. Outputs in `<output_dir>`: `checkpoints/`, `final_model/`,
`metrics.jsonl`, `loss_curve.png`, `run_finished.json`, and the seed's `dna_model/model_epoch_N.pt` (per epoch) and
`logs/training_*.log` (every step).
"""

from __future__ import annotations

# isort: off
import biorecipes_shared.stop_signals  # noqa: F401  (first: a SIGTERM during the imports below sets a flag)

# isort: on
import contextlib
import math
import sys

import torch

from biorecipes_shared import (
    TrainingRun,
    all_reduce_mean,
    barrier,
    get_logger,
    peak_memory,
    run_cli,
    setup_distributed,
    teardown_distributed,
)
from config import Config, load, validate
from data import Batch, PlantDataError, window_stride
from export import rotate_epoch_files, write_epoch_file, write_export
from run_state import Run, RunLog, RunState, build_run, open_metrics


def train(cfg: Config) -> dict:
    """Run, resume or (when finished) skip training; returns the per-step losses of this call and the outputs."""
    validate(cfg)
    training = TrainingRun(
        cfg.output_dir, cfg.max_steps, cfg.save_every, cfg.keep_last, cfg.resume, data_position="global"
    )
    if training.report_finished():  # a finished run stays finished: nothing is built
        return {"losses": [], "finished": True, "checkpoint": None, "bad_files": {}, "species": []}
    ctx = setup_distributed(cfg.seed)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    log = get_logger("plant_lm", ctx)
    run_log = RunLog(log, training.layout.output_dir / "logs", ctx.is_main)
    try:
        run, state = build_run(cfg, training, ctx, log)  # a refusal leaves nothing: run_cli releases the lock
        run_log.start()
        with open_metrics(run, state), run.training:
            train_epochs(run, state)
        return finish(run, state)
    finally:
        run_log.close()
        teardown_distributed()


def train_epochs(run: Run, state: RunState) -> None:
    """The loop: epochs of `steps_per_epoch` steps until `max_steps`, or until a stop signal (then it saves and
    `run.training.stopped`). A checkpoint at every epoch end, every `save_every` steps and on a stop signal."""
    cfg, training = run.cfg, run.training
    if training.stop_requested():  # signalled during imports or set-up: the state is the one resumed from
        run.log.warning("stopped on a preemption signal before the first step (at step %d): nothing new to save; "
                        "run the same command again to continue", state.step)  # fmt: skip
        return
    while state.step < cfg.max_steps:
        batches = epoch_batches(run, state)
        for _ in range(state.step_in_epoch, cfg.steps_per_epoch):
            micro_batches = [next(batches) for _ in range(cfg.accumulation_steps)]
            loss, grad_norm = train_step(run, state, micro_batches)
            log_step(run, state, loss, grad_norm, micro_batches)
            epoch_done = state.step_in_epoch == cfg.steps_per_epoch
            if epoch_done:
                end_epoch(run, state)
            if training.should_save(state.step) or epoch_done:  # the seed's users get a checkpoint per epoch too
                run.log.info("saved %s", training.save(state.step))
            if training.stopped:
                run.log.warning("stopped on a preemption signal after step %d; run the same command again to resume",
                                state.step)  # fmt: skip
                return


def epoch_batches(run: Run, state: RunState):
    """The batches of `state.epoch` from `state.step_in_epoch` on; seeds the dropout stream by (seed, rank, epoch)
    unless this is a mid-epoch resume that restored the saved stream."""
    cfg = run.cfg
    if not (state.step_in_epoch and state.rng_restored):
        torch.manual_seed(cfg.seed + run.ctx.rank + 1000 * state.epoch)
    run.model.train()
    per_step = cfg.accumulation_steps
    return run.mixture.batches(cfg.batch_size, cfg.steps_per_epoch * per_step, state.epoch,
                               skip=state.step_in_epoch * per_step)  # fmt: skip


def train_step(run: Run, state: RunState, micro_batches: list[Batch]) -> tuple[float, float]:
    """One optimizer step over the accumulation micro-batches, then the bucket memory commit; advances `state`.

    Returns (loss averaged over micro-batches and ranks, grad norm before clipping)."""
    cfg, model, ddp = run.cfg, run.model, run.ddp
    step_loss = 0.0
    for micro, batch in enumerate(micro_batches):
        sync_now = ddp is None or micro == len(micro_batches) - 1
        with contextlib.nullcontext() if sync_now else ddp.no_sync():
            with torch.autocast(run.ctx.device.type, dtype=run.dtype, enabled=run.dtype is not None):
                out = (ddp or model)(
                    batch.input_ids.to(run.ctx.device),
                    batch.species_ids.to(run.ctx.device),
                    batch.targets.to(run.ctx.device),
                    memory_write_len=window_stride(cfg.context_size, cfg.overlap_ratio),
                )
            run.scaler.scale(out["loss"] / len(micro_batches)).backward()
        step_loss += out["loss"].item() / len(micro_batches)
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    model.memory.commit(cfg.global_context, cfg.memory_normalize_every)  # after the step, outside autograd
    loss = all_reduce_mean(step_loss)
    state.step += 1
    state.step_in_epoch += 1
    state.losses.append(loss)
    state.epoch_losses.append(loss)
    return loss, float(grad_norm)


def gpu_status(device: torch.device) -> dict[str, float]:
    """CUDA memory and, when NVML is available, utilisation; empty on CPU."""
    if device.type != "cuda":
        return {}
    status = {"cuda_alloc_gib": torch.cuda.memory_allocated(device) / 2**30}
    with contextlib.suppress(Exception):  # torch.cuda.utilization needs pynvml
        status["gpu_util_pct"] = float(torch.cuda.utilization(device))
    return status


def log_step(run: Run, state: RunState, loss: float, grad_norm: float, micro_batches: list[Batch]) -> None:
    """Per-step line in the run log and a metrics.jsonl record: loss, throughput, memory, GPU status."""
    # Every training window is whole (a run too short for one yields none), so there is no padding: the positions
    # computed on are all real tokens and useful_token_fraction is 1 by construction.
    tokens = sum(batch.input_ids.numel() for batch in micro_batches)
    run.meter.update(samples=run.cfg.batch_size * len(micro_batches), tokens=tokens, positions=tokens)
    lr = run.scheduler.get_last_lr()[0]
    record = {"loss": loss, "lr": lr, "grad_norm": grad_norm, **run.meter.rates(), **peak_memory(),
              **gpu_status(run.ctx.device)}  # fmt: skip
    run.metrics.log(state.step, epoch=state.epoch + 1, **record)
    run.log.info(
        "epoch %d step %d loss %.4f lr %.2e grad_norm %.3f %.1f samples/s %.0f tokens/s useful %.2f rss %.2f GiB%s",
        state.epoch + 1, state.step, loss, lr, grad_norm, record["samples_per_s"], record["tokens_per_s"],
        record["useful_token_fraction"], record["cpu_rss_gib"],
        "".join(f" {k} {v:.2f}" for k, v in record.items() if k.startswith(("cuda", "gpu"))),
    )  # fmt: skip


def end_epoch(run: Run, state: RunState) -> None:
    """Log the epoch's mean loss, write the seed's dna_model/model_epoch_N.pt (before the resume checkpoint, so a
    kill between the two retrains the epoch and rewrites the same file), and move `state` to the next epoch."""
    run.log.info("epoch %d mean loss %.4f (a uniform guess over 4096 6-mers scores %.4f)", state.epoch + 1,
                 sum(state.epoch_losses) / len(state.epoch_losses), math.log(4096))  # fmt: skip
    if run.ctx.is_main:
        epoch_dir = run.training.layout.output_dir / "dna_model"
        write_epoch_file(run, epoch_dir / f"model_epoch_{state.epoch + 1}.pt", state.epoch + 1, state.step)
        rotate_epoch_files(epoch_dir, run.cfg.keep_last)
    barrier()
    state.epoch, state.step_in_epoch, state.epoch_losses = state.epoch + 1, 0, []


def finish(run: Run, state: RunState) -> dict:
    """At the last step: export final_model/, plot the loss curve, mark the run finished; say where outputs are."""
    layout = run.training.layout
    species = run.mixture.species
    done = run.training.finish(export=lambda folder: write_export(run.model, run.cfg, species, folder))
    if done:
        run.log.info("finished at step %d; outputs in %s (final model: %s)", state.step, layout.output_dir,
                     layout.final_model)  # fmt: skip
    else:
        run.log.info("stopped at step %d; checkpoints in %s (run the same command to continue)", state.step,
                     layout.checkpoints)  # fmt: skip
    bad_files = {path: why for stream in run.mixture.streams.values() for path, why in stream.bad_files.items()}
    if bad_files:
        run.log.warning("%d bad file(s) were skipped: %s", len(bad_files), "; ".join(bad_files.values()))
    return {"losses": state.losses, "checkpoint": layout.final_model if done else None, "bad_files": bad_files,
            "species": species, "finished": done, "step": state.step}  # fmt: skip


def report(result: dict) -> None:
    losses = result["losses"]
    if losses:
        n = min(10, len(losses))  # single steps are noisy: compare the means of the first and last n steps
        first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
        print(f"done: loss (mean of {n} steps) {first:.4f} -> {last:.4f}; step {result['step']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: report(train(load(argv))), user_errors=(PlantDataError,))


if __name__ == "__main__":
    sys.exit(main())  # run_cli ignores stop signals from its return on: a late one cannot make the exit code -15
