"""Train the bidirectional Mamba genome-fragment embedder on GTDB with a CurricularFace head.

    torchrun --nproc_per_node=4 train.py data.genomes_root=... 'data.metadata_files=[...]'
    srun python train.py ...                        # under SLURM (slurm_train.sh)
    python train.py --config-name sample            # the bundled fixture (see train_sample.sh)

Each training genome is a class; every `train.steps_per_epoch` optimizer steps the model embeds a fixed set of
fragments from held-out families and reports the same-genome ROC AUC (AUC_log.tsv, pairwise_distances_histogram.png).
The run follows the biorecipes run contract (the shared `TrainingRun`): the same command starts, resumes (newest
valid checkpoint) and, once the run is finished, does nothing; SIGTERM/SIGUSR1 save a checkpoint and exit 0.
Outputs: `<output_dir>/{checkpoints/step_N,final_model,metrics.jsonl,loss_curve.png,run_finished.json}` + the seed's
files.
"""

from __future__ import annotations

# isort: off
import biorecipes_shared.stop_signals  # noqa: F401  (first: a SIGTERM during the imports below sets a flag)

# isort: on
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch._dynamo.exc import TorchDynamoException

from biorecipes_shared import (
    TrainingRun,
    all_reduce_mean,
    get_logger,
    peak_memory,
    read_launch_env,
    run_cli,
    setup_distributed,
    teardown_distributed,
)
from config import Config, validate
from export import fragment_record, write_export
from metrics import validation_auc, write_distance_histogram
from preprocess import GtdbDataError
from run_state import Run, RunState, build_run, check_init_from, compile_error
from sweep import SweepJob, describe_swept, jobs_from_argv, write_sweep_record

__all__ = ["main", "run"]


def run(cfg: Config, sweep_job: SweepJob | None = None, keep_process_group: bool = False) -> dict:
    """The whole training run (first start, resume, or a no-op when finished); returns a summary of this call.

    `sweep_job`: the job of a sweep (`-m`) this run is; its swept values are recorded in the run folder once set-up
    has succeeded, so a failed start leaves nothing behind. `keep_process_group`: leave it for the next sweep job
    (under torchrun a second `init_process_group` after `destroy_process_group` hung here)."""
    t_start = time.perf_counter()
    validate(cfg)
    training = TrainingRun(
        cfg.output_dir, cfg.train.max_steps, cfg.train.save_every, cfg.train.keep_last, cfg.train.resume,
        data_position="per_rank",  # each rank trains its own genome shard
    )  # fmt: skip
    dist_ctx = setup_distributed(cfg.seed)
    log = get_logger("gtdb_mamba", dist_ctx)
    for name in ("preprocess", "data"):
        get_logger(name, dist_ctx)
    try:
        if message := training.finished_message():
            if dist_ctx.is_main:
                print(message, flush=True)
            return {"finished": True}
        if cfg.train.init_from and not any(training.layout.checkpoints.glob("step_*")):
            check_init_from(cfg)  # a fresh start: refuse an export that does not fit before the run folder is made
        run, state = build_run(cfg, dist_ctx, log, training, t_start)
        if sweep_job is not None:
            write_sweep_record(sweep_job)
        with run.metrics, training:
            train_loop(run, state)
        finish(run, state)
        return state.summary()
    except TorchDynamoException as err:  # inductor needs a C++ compiler (CPU) or Triton (CUDA)
        raise compile_error(cfg, err) from None
    finally:
        if not keep_process_group:
            teardown_distributed()


def train_loop(run: Run, state: RunState) -> None:
    """Steps until `stop_step` or a stop signal; validation each epoch; a checkpoint when the run says so, at
    each epoch end (after its validation) and at `train.stop_at_step`."""
    cfg, training = run.cfg, run.training
    if training.preemption.should_stop():  # signalled during imports or set-up: the newest checkpoint is this state
        run.log.warning(
            "stopped on a preemption signal before step %d; run the same command to continue", state.step + 1
        )
        state.preempted = True
        return
    if cfg.val.at_start and state.step == 0:
        validate_and_log(run, state)
    batches = run.batches(state.step)
    while state.step < cfg.stop_step:
        grad_norm = train_step(run, state, [next(batches) for _ in range(cfg.train.grad_accumulation)])
        if state.step % cfg.train.log_every == 0 or state.step == cfg.stop_step:
            log_step(run, state, grad_norm)
        end_of_epoch = state.step % cfg.train.steps_per_epoch == 0
        if end_of_epoch:
            validate_and_log(run, state)
        if training.should_save(state.step) or end_of_epoch or state.step == cfg.stop_step:
            training.save(state.step)
        if training.stopped:
            run.log.warning("stopped on a preemption signal at step %d; run the same command to resume", state.step)
            state.preempted = True
            return


def train_step(run: Run, state: RunState, micro_batches: list[dict]) -> float:
    """One optimizer step over the micro-batches (tokens (batch, length), labels (batch,)); advances `state` (step,
    loss window) and returns the gradient norm before clipping."""
    device, last, loss_sum = run.dist_ctx.device, len(micro_batches) - 1, 0.0
    for micro, batch in enumerate(micro_batches):
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        # DDP all-reduces gradients only on the last micro-batch of an accumulation group.
        with run.trained.no_sync() if run.dist_ctx.is_distributed and micro != last else nullcontext():
            with run.autocast():
                loss = F.cross_entropy(run.trained(tokens, labels), labels) / len(micro_batches)
            loss.backward()
        loss_sum += loss.item()
        real_tokens = int((tokens != run.model_config.pad_token).sum())
        run.meter.update(samples=tokens.shape[0], tokens=real_tokens, positions=tokens.numel())
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.train.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step, state.window_loss, state.window_steps = (
        state.step + 1,
        state.window_loss + loss_sum,
        state.window_steps + 1,
    )
    if state.time_to_first_step_s is None:
        state.time_to_first_step_s = time.perf_counter() - state.t_start
        run.log.info("time to first step: %.2f s", state.time_to_first_step_s)
    return float(grad_norm)


def log_step(run: Run, state: RunState, grad_norm: float) -> None:
    """Mean loss since the last log line (all ranks), to metrics.jsonl, log_file.txt and the console."""
    mean_loss = float(all_reduce_mean(state.window_loss / state.window_steps))
    state.window_loss, state.window_steps = 0.0, 0
    state.losses.append((state.step, mean_loss))
    rates = run.meter.rates()  # real (non-padding) tokens of this process, and their share of the positions computed
    run.metrics.log(
        state.step, loss=mean_loss, lr=run.scheduler.get_last_lr()[0], grad_norm=grad_norm,
        curricular_t=float(run.model.head.t), **rates, **peak_memory(),
    )  # fmt: skip
    run.log.info("step %d: loss %.4f, %.0f tokens/s, useful token fraction %.2f", state.step, mean_loss,
                 rates["tokens_per_s"], rates["useful_token_fraction"])  # fmt: skip


def validate_and_log(run: Run, state: RunState) -> None:
    """The same-genome AUC of the validation fragments (mean over ranks), logged; the histogram on rank 0."""
    auc, distances, same = validation_auc(
        run.model.embedder, run.val_tokens, run.val_labels, run.cfg.val.batch_size, run.autocast
    )
    auc = float(all_reduce_mean(auc))
    if run.dist_ctx.is_main:
        histogram = run.training.layout.output_dir / "pairwise_distances_histogram.png"
        write_distance_histogram(histogram, distances, same, auc, state.step)
    run.metrics.log(state.step, auc=auc)
    state.aucs.append((state.step, auc))
    run.log.info("step %d: validation AUC %.4f", state.step, auc)


def finish(run: Run, state: RunState) -> None:
    """At max_steps: export the embedder, plot the loss, mark the run finished; say where the outputs are."""
    layout, cfg = run.training.layout, run.cfg
    if state.step < cfg.train.max_steps or state.preempted:
        run.log.info("stopped at step %d; checkpoints in %s (run the same command to continue)", state.step,
                     layout.checkpoints)  # fmt: skip
        return

    def export(folder):
        write_export(run.model.embedder, run.model_config, cfg.data.kmer, folder, fragment_record(cfg))

    run.training.finish(export=export)
    run.log.info("finished at step %d; outputs in %s (final model: %s)", state.step, layout.output_dir,
                 layout.final_model)  # fmt: skip


def run_jobs(argv: list[str]) -> int:
    """Every job of the command line, one after the other (a sweep stops at a preemption signal or an error)."""
    jobs = jobs_from_argv(argv)
    is_main = read_launch_env()[0] == 0  # before the process group exists (torchrun or SLURM variables)
    for job in jobs:
        if is_main and job.number is not None:
            header = f"sweep job {job.number} ({len(jobs)} jobs): output_dir={job.cfg.output_dir}"
            print(f"{header} {describe_swept(job.swept)}".strip(), file=sys.stderr, flush=True)
        last = job is jobs[-1]
        if run(job.cfg, job if job.number is not None else None, keep_process_group=not last).get("preempted"):
            if is_main and job.number is not None and job.number + 1 < len(jobs):
                print("sweep stopped by the signal: run the same command to continue it", file=sys.stderr, flush=True)
            teardown_distributed()
            break
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: one `error: ...` line and exit 1 for bad input, settings or a failed write."""
    return run_cli(lambda: run_jobs(sys.argv[1:] if argv is None else argv), user_errors=(GtdbDataError,))


if __name__ == "__main__":
    sys.exit(main())  # run_cli ignores stop signals from its return on: a late one cannot make the exit code -15
