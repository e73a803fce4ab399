"""Train the bidirectional Mamba genome-fragment embedder on GTDB with a CurricularFace head.

    torchrun --nproc_per_node=4 train.py data.genomes_root=... 'data.metadata_files=[...]'
    srun python train.py ...                        # under SLURM (slurm_train.sh)
    python train.py --config-name sample            # the bundled fixture (see train_sample.sh)

Each training genome is a class; every `train.steps_per_epoch` optimizer steps the model embeds a fixed set of
fragments from held-out families and reports the same-genome ROC AUC (AUC_log.tsv, pairwise_distances_histogram.png).
The run follows the biorecipes run contract: the same command starts, resumes (newest valid checkpoint) and, once
the run is finished, does nothing; SIGTERM/SIGUSR1 save a checkpoint and exit 0.
Outputs: `<run_dir>/{checkpoints/step_N,final_model,metrics.jsonl,loss_curve.png,run_finished.json}` + the seed's files.
"""

from __future__ import annotations

# isort: off
import biorecipes_shared.stop_signals  # noqa: F401  (first: a SIGTERM during the imports below sets a flag)

# isort: on
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch._dynamo.exc import TorchDynamoException
from torch.nn.parallel import DistributedDataParallel

from biorecipes_shared.checkpoint import (
    PreemptionHandler,
    load_checkpoint,
    save_checkpoint,
)
from biorecipes_shared.distributed import (
    all_reduce_mean,
    barrier,
    read_launch_env,
    setup_distributed,
    teardown_distributed,
)
from biorecipes_shared.logging_utils import MetricsWriter, ThroughputMeter, get_logger, peak_memory
from biorecipes_shared.run import (
    RunLayout,
    finished_message,
    finished_run,
    mark_finished,
    resolve_resume,
    run_cli,
)
from components import (
    EmbedderWithHead,
    autocast,
    build_model,
    check_init_from,
    compile_error,
    embedder_config,
    plot_curve,
    refuse_other_world_size,
    resume_error,
    validate,
)
from data import (
    FragmentSampler,
    KmerTokenizer,
    TrainBatches,
    check_data_fingerprint,
    prepare_data,
    train_loader,
    validation_fragments,
)
from exports import fragment_record, init_from, write_export
from model import EmbedderConfig, mamba_ssm_available
from preprocess import GtdbDataError
from settings import SweepJob, check_config, describe_swept, jobs_from_argv, write_sweep_record

__all__ = ["check_config", "main", "prepare_data", "run"]

TSV_FILES = {"log_file.txt": ["loss", "step"], "AUC_log.tsv": ["auc", "step"]}


@dataclass
class Setup:
    """What start-up builds, once per process, before the first step."""

    cfg: DictConfig
    dist_ctx: object
    log: object
    layout: RunLayout
    model: EmbedderWithHead
    trained: nn.Module  # the DDP wrapper, or the model itself in one process
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    model_config: EmbedderConfig
    dataset: TrainBatches
    val_tokens: torch.Tensor
    val_labels: torch.Tensor
    stop_step: int
    split: object  # the family split, for the data fingerprint
    train_sampler: FragmentSampler


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
    time_to_first_step_s: float | None = None
    preempted: bool = False

    def control(self) -> dict:
        return {"window_loss": self.window_loss, "window_steps": self.window_steps}

    def summary(self) -> dict:
        return {
            "aucs": self.aucs,
            "losses": self.losses,
            "time_to_first_step_s": self.time_to_first_step_s,
            "start_step": self.start_step,
            "step": self.step,
            "preempted": self.preempted,
        }


def run(cfg: DictConfig, sweep_job: SweepJob | None = None, keep_process_group: bool = False) -> dict:
    """The whole training run (first start, resume, or a no-op when finished); returns a summary of this call.

    `sweep_job`: the job of a sweep (`-m`) this run is; its swept values are recorded in the run folder once set-up
    has succeeded, so a failed start leaves nothing behind. `keep_process_group`: leave it for the next sweep job
    (under torchrun a second `init_process_group` after `destroy_process_group` hung here)."""
    t_start = time.perf_counter()
    check_config(cfg)
    layout = RunLayout(Path(cfg.run_dir))
    dist_ctx = setup_distributed(cfg.seed)
    log = get_logger("gtdb_mamba", dist_ctx)
    for name in ("preprocess", "data"):
        get_logger(name, dist_ctx)
    try:
        if done := finished_run(layout, target_step=cfg.train.max_steps):
            if dist_ctx.is_main:
                print(finished_message(layout, done), flush=True)
            return {"finished": True, "step": int(done["step"]), "start_step": int(done["step"])}
        if cfg.train.get("init_from") and not any(layout.checkpoints.glob("step_*")):
            check_init_from(cfg)  # a fresh start: refuse an export that does not fit before the run folder is made
        resume_from = resolve_resume(cfg.train.resume, layout.checkpoints)
        if resume_from is not None:
            refuse_other_world_size(resume_from, dist_ctx.world_size)
        setup = set_up(cfg, dist_ctx, log, layout, fresh=resume_from is None)
        state = restore(setup, resume_from)  # a checkpoint of another shape gets its own error first
        check_data_fingerprint(layout.output_dir, cfg.data, setup.split, setup.train_sampler, resume_from is not None)
        if sweep_job is not None:
            write_sweep_record(sweep_job)
        with (
            MetricsWriter(layout.output_dir, dist_ctx, tsv_files=TSV_FILES, resume_step=state.step) as metrics,
            PreemptionHandler() as preempt,
        ):
            train_loop(setup, state, metrics, preempt, t_start)
        finish(setup, state)
        return state.summary()
    except TorchDynamoException as err:  # inductor needs a C++ compiler (CPU) or Triton (CUDA)
        raise compile_error(cfg, err) from None
    finally:
        if not keep_process_group:
            teardown_distributed()


def set_up(cfg: DictConfig, dist_ctx, log, layout: RunLayout, fresh: bool) -> Setup:
    """Data, validation fragments, model, optimizer (and `train.init_from` weights on a fresh start)."""
    tokenizer = KmerTokenizer(cfg.data.kmer)
    model_config = embedder_config(cfg)
    init_path = cfg.train.get("init_from") if fresh else None
    if init_path:  # check the record before the (slow) index build; load the weights after the model exists
        check_init_from(cfg)
    split, train_sampler, val_sampler = prepare_data(cfg, dist_ctx, log)
    val_tokens, val_labels = validation_fragments(
        val_sampler,
        tokenizer,
        cfg.val.fragments_per_genome,
        cfg.data.val_tokens,
        cfg.seed,
        dist_ctx.rank,
        cfg.data.reverse_complement,
    )
    n_classes = train_sampler.n_classes
    model, optimizer, scheduler = build_model(cfg, model_config, n_classes, dist_ctx.device)
    if init_path:
        init_from(init_path, model.embedder, model_config, cfg.data.kmer)
        log.info("embedder initialised from %s (new CurricularFace head for %d classes)", init_path, n_classes)
    dataset = TrainBatches(
        train_sampler,
        tokenizer,
        cfg.train.batch_size,
        cfg.data.train_tokens,
        cfg.seed,
        dist_ctx.rank,
        cfg.data.reverse_complement,
    )
    trained = DistributedDataParallel(model) if dist_ctx.is_distributed else model
    stop_step = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
    return Setup(
        cfg, dist_ctx, log, layout, model, trained, optimizer, scheduler, model_config, dataset, val_tokens, val_labels,
        stop_step, split, train_sampler,
    )  # fmt: skip


def restore(setup: Setup, resume_from: Path | None) -> RunState:
    """A fresh RunState, or the one saved in `resume_from` (weights incl. CurricularFace t, optimizer, RNG)."""
    state = RunState()
    if resume_from is not None:
        try:
            saved = load_checkpoint(resume_from, setup.model, setup.optimizer, setup.scheduler)
        except RuntimeError as err:  # CheckpointError, or load_state_dict's multi-line size mismatch
            raise resume_error(resume_from, err) from None
        state.step = state.start_step = saved.step
        state.window_loss = float(saved.extra.get("window_loss", 0.0))
        state.window_steps = int(saved.extra.get("window_steps", 0))
        setup.log.info("resumed from %s (step %d)", resume_from, saved.step)
    backend = "mamba_ssm" if setup.cfg.model.backend == "auto" and mamba_ssm_available() else "pure PyTorch (mambapy)"
    setup.log.info(
        "model: %.2fM parameters, Mamba backend %s, device %s, world size %d",
        sum(p.numel() for p in setup.model.parameters()) / 1e6,
        backend,
        setup.dist_ctx.device,
        setup.dist_ctx.world_size,
    )
    return state


def train_loop(setup: Setup, state: RunState, metrics: MetricsWriter, preempt, t_start: float) -> None:
    """Steps until `stop_step` or a preemption signal; validation each epoch, checkpoints as configured."""
    cfg, accumulation = setup.cfg, setup.cfg.train.grad_accumulation
    if preempt.should_stop():  # signalled during imports or set-up: the newest checkpoint (if any) is this state
        setup.log.warning(
            "stopped on a preemption signal before step %d; run the same command to continue", state.step + 1
        )
        state.preempted = True
        return
    if cfg.val.at_start and state.step == 0:
        validate_and_log(setup, state, metrics)
    # Batch b of this rank is a pure function of (seed, rank, b): resuming at `step` needs no loader state.
    loader = train_loader(
        setup.dataset, state.step * accumulation, (setup.stop_step - state.step) * accumulation, cfg.data.num_workers
    )
    batches, meter = iter(loader), ThroughputMeter()
    while state.step < setup.stop_step:
        loss, grad_norm = train_step(setup, batches, meter)
        state.step += 1
        state.window_loss, state.window_steps = state.window_loss + loss, state.window_steps + 1
        if state.time_to_first_step_s is None:
            state.time_to_first_step_s = time.perf_counter() - t_start
            setup.log.info("time to first step: %.2f s", state.time_to_first_step_s)
        if state.step % cfg.train.log_every == 0 or state.step == setup.stop_step:
            log_step(setup, state, metrics, grad_norm, meter)
        end_of_epoch = state.step % cfg.train.steps_per_epoch == 0
        if end_of_epoch:
            validate_and_log(setup, state, metrics)
        preempted = preempt.should_stop()
        if end_of_epoch or preempted or state.step == setup.stop_step or state.step % cfg.train.checkpoint_every == 0:
            save(setup, state)
        if preempted:
            setup.log.warning("stopped on a preemption signal at step %d; run the same command to resume", state.step)
            state.preempted = True
            return


def train_step(setup: Setup, batches, meter: ThroughputMeter) -> tuple[float, float]:
    """One optimizer step over `grad_accumulation` micro-batches; returns (this rank's loss, grad norm)."""
    accumulation, dist_ctx = setup.cfg.train.grad_accumulation, setup.dist_ctx
    loss_sum = 0.0
    for micro in range(accumulation):
        batch = next(batches)
        tokens, labels = batch["tokens"].to(dist_ctx.device), batch["labels"].to(dist_ctx.device)
        sync = micro == accumulation - 1
        real_tokens = int((tokens != setup.model_config.pad_token).sum())
        # DDP all-reduces gradients only on the last micro-batch of an accumulation group.
        with setup.trained.no_sync() if dist_ctx.is_distributed and not sync else nullcontext():
            with autocast(setup.cfg, dist_ctx):
                loss = F.cross_entropy(setup.trained(tokens, labels), labels) / accumulation
            loss.backward()
        loss_sum += loss.item()
        meter.update(samples=tokens.shape[0], tokens=real_tokens, positions=tokens.numel())
    grad_norm = torch.nn.utils.clip_grad_norm_(setup.model.parameters(), setup.cfg.train.grad_clip)
    setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return loss_sum, float(grad_norm)


def log_step(setup: Setup, state: RunState, metrics: MetricsWriter, grad_norm: float, meter) -> None:
    """Mean loss since the last log line (all ranks), to metrics.jsonl, log_file.txt and the console."""
    mean_loss = float(all_reduce_mean(state.window_loss / state.window_steps))
    state.window_loss, state.window_steps = 0.0, 0
    state.losses.append((state.step, mean_loss))
    rates = meter.rates()  # real (non-padding) tokens of this process, and their share of the positions computed
    metrics.log(
        state.step,
        loss=mean_loss,
        lr=setup.scheduler.get_last_lr()[0],
        grad_norm=grad_norm,
        curricular_t=float(setup.model.head.t),
        **rates,
        **peak_memory(),
    )
    setup.log.info(
        "step %d: loss %.4f, %.0f tokens/s, useful token fraction %.2f",
        state.step,
        mean_loss,
        rates["tokens_per_s"],
        rates["useful_token_fraction"],
    )


def validate_and_log(setup: Setup, state: RunState, metrics: MetricsWriter) -> None:
    auc = validate(
        setup.model.embedder,
        setup.val_tokens,
        setup.val_labels,
        setup.cfg,
        setup.dist_ctx,
        setup.layout.output_dir,
        state.step,
        metrics,
    )
    state.aucs.append((state.step, auc))
    setup.log.info("step %d: validation AUC %.4f", state.step, auc)


def save(setup: Setup, state: RunState) -> None:
    save_checkpoint(
        setup.layout.checkpoints,
        state.step,
        setup.model,
        setup.optimizer,
        setup.scheduler,
        data_state={"step": state.step},
        extra=state.control(),
        keep_last_k=setup.cfg.train.keep_last_k,
    )


def finish(setup: Setup, state: RunState) -> None:
    """At max_steps: export the embedder, plot the loss, mark the run finished; say where the outputs are."""
    layout, log = setup.layout, setup.log
    if state.step >= setup.cfg.train.max_steps and not state.preempted:
        if setup.dist_ctx.is_main:
            write_export(
                setup.model.embedder, setup.model_config, setup.cfg.data.kmer, layout.final_model,
                fragment_record(setup.cfg),
            )  # fmt: skip
            if layout.metrics.is_file():
                plot_curve(layout)
        barrier()
        mark_finished(layout, state.step, "max steps reached")
        log.info("finished at step %d; outputs in %s (final model: %s)", state.step, layout.output_dir,
                 layout.final_model)  # fmt: skip
    else:
        log.info("stopped at step %d; checkpoints in %s (run the same command to continue)", state.step,
                 layout.checkpoints)  # fmt: skip


def run_jobs(argv: list[str]) -> int:
    """Every job of the command line, one after the other (a sweep stops at a preemption signal or an error)."""
    jobs = jobs_from_argv(argv)
    is_main = read_launch_env()[0] == 0
    for job in jobs:
        if is_main and job.number is not None:
            header = f"sweep job {job.number} ({len(jobs)} jobs): run_dir={job.cfg.run_dir} {describe_swept(job.swept)}"
            print(header.strip(), file=sys.stderr, flush=True)
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
