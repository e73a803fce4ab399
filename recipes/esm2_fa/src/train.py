"""ESM-2 masked-LM pretraining with HF Trainer + accelerate on token-budget shards.

    accelerate launch src/train.py --train_dir data/train --val_dir data/val
    torchrun --nproc_per_node=8 src/train.py --train_dir data/train --val_dir data/val training.max_steps=1000
    python src/train.py --config src/config_tiny_cpu.yaml --train_dir ... --val_dir ...   # one CPU process

Trailing `section.key=value` arguments override the YAML config. The same command serves the first run and every
requeue: `--resume_from_checkpoint auto` (the default; `latest` means the same) continues from the newest complete
`<output_dir>/checkpoints/step_N/`, including the position in the training data stream, or starts fresh; `none`
starts fresh (refused when checkpoints exist); a path resumes exactly that checkpoint. A finished run stays finished.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import astuple, dataclass
from pathlib import Path

from transformers import EarlyStoppingCallback, EsmConfig, set_seed
from transformers.integrations import is_tensorboard_available, is_wandb_available
from transformers.trainer_callback import PrinterCallback, TrainerState

from biorecipes_shared.checkpoint import PreemptionHandler
from biorecipes_shared.distributed import read_launch_env, teardown_distributed
from biorecipes_shared.files import TMP_PREFIX, WriteError, describe_write_error, swap_into_place
from biorecipes_shared.logging_utils import MetricsWriter, get_logger, plot_loss_curve
from biorecipes_shared.run import (
    RunLayout,
    finished_message,
    finished_run,
    mark_finished,
    resolve_resume,
    run_cli,
)
from config import ConfigError, ModelConfig, RecipeConfig, load_config
from data_processing import PACKING_FILE, FastaError, read_packing
from dataset import DataDirError, ShardStream, check_data_fingerprints, check_shards
from hf_checkpoint import check_stream_state, checkpoint_step, read_loss_window, run_was_over
from model import (
    ModelConfigError,
    build_model,
    check_attention_dropout,
    esm2_config,
    resolve_attention,
    save_tokenizer,
    weights_file,
)
from trainer import (  # noqa: F401  (esm2_lr_lambda, masked_lm_loss, fused_adamw_supported: the recipe's public names)
    EsmMlmTrainer,
    MetricsCallback,
    PreemptionCallback,
    esm2_lr_lambda,
    fused_adamw_supported,
    masked_lm_loss,
    training_arguments,
)

log = get_logger("esm2_fa")
USER_ERRORS = (DataDirError, ModelConfigError, FastaError)


def export_final_model(trainer: EsmMlmTrainer, out_dir: Path) -> None:
    """save_pretrained (safetensors) + tokenizer into out_dir, written under a temp name and then swapped in.

    Raises WriteError (one line) when the disk is full or the folder unwritable; the temp dir is removed and an
    earlier export stays as it was.
    """
    tmp = out_dir.with_name(f"{TMP_PREFIX}{out_dir.name}")
    try:
        trainer.save_model(str(tmp))  # every rank: under DDP/FSDP the weights may need gathering
        if trainer.is_world_process_zero():
            save_tokenizer(tmp)
            config_file = tmp / "config.json"
            config = json.loads(config_file.read_text())
            config["architectures"] = ["EsmForMaskedLM"]  # save_pretrained wrote faesm's class; same weights
            config_file.write_text(json.dumps(config, indent=2) + "\n")
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the export stays pickle-free
            swap_into_place(tmp, out_dir)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(describe_write_error(err, out_dir)) from err


def check_report_to(report_to: str) -> None:
    """The logging integration must import now: the Trainer would otherwise fail after creating the output dir."""
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


@dataclass
class Resume:
    """Where this run starts: a checkpoint (None: fresh), its step, batches each rank consumed, the loss window."""

    checkpoint: Path | None = None
    step: int = 0
    consumed: int = 0
    loss_window: tuple[float, int] | None = None


def check_inputs(cfg: RecipeConfig) -> tuple[EsmConfig, str]:
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
    return config, backend


def find_resume(cfg: RecipeConfig, layout: RunLayout, resume: str | None, world: tuple[int, int]) -> Resume:
    """The checkpoint to continue (shared policy: auto / none / a path), checked against this run's world size."""
    checkpoint = resolve_resume(resume, layout.checkpoints)
    if checkpoint is None:
        return Resume()
    consumed = check_stream_state(checkpoint, world[1], cfg.data.num_workers)
    return Resume(checkpoint, checkpoint_step(checkpoint), consumed, read_loss_window(checkpoint, world[0]))


def build_trainer(cfg, config, backend, stream, resume: Resume, world, writer, preemption) -> EsmMlmTrainer:
    """Model (initial weights: the seed, or model.model_name's published weights) and the Trainer around it."""
    t = cfg.training
    set_seed(t.seed)  # identical initial weights on every rank
    model = build_model(config, backend, weights=weights_file(cfg.model.model_name))
    for param in model.esm.contact_head.parameters():  # not used by MLM; frozen so DDP sees no unused grads
        param.requires_grad_(False)
    callbacks = [preemption]
    if t.early_stopping.enabled:
        callbacks.append(EarlyStoppingCallback(t.early_stopping.patience, t.early_stopping.threshold))
    trainer = EsmMlmTrainer(
        model=model,
        args=training_arguments(cfg, RunLayout(t.output_dir).checkpoints),
        train_dataset=stream,
        eval_dataset=stream,  # placeholder: evaluate() reads the val shards itself
        callbacks=callbacks,
        train_stream=stream,
        recipe=cfg,
        world=world,
        loss_window=resume.loss_window,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(MetricsCallback(writer, trainer))
    return trainer


def train_or_restore(trainer: EsmMlmTrainer, cfg: RecipeConfig, start: Resume, preemption) -> bool:
    """Train from `start`; False when preempted before the end (a checkpoint was saved).

    A checkpoint saved when the run was already over (killed before `run_finished.json`) is not trained on: its
    state and (best) weights are restored for the export.
    """
    t = cfg.training
    patience = t.early_stopping.patience if t.early_stopping.enabled else None
    if start.checkpoint is not None and run_was_over(start.checkpoint, t.max_steps, patience):
        trainer.state = TrainerState.load_from_json(str(start.checkpoint / "trainer_state.json"))
        if t.load_best_model_at_end:
            trainer._load_best_model()
        else:
            trainer._load_from_checkpoint(str(start.checkpoint))
        return True
    trainer.train(resume_from_checkpoint=str(start.checkpoint) if start.checkpoint else None)
    return preemption.stopped_at is None or trainer.state.global_step >= t.max_steps


def finish(trainer: EsmMlmTrainer, cfg: RecipeConfig, layout: RunLayout, writer: MetricsWriter) -> Path:
    """Export final_model/, plot the loss, and mark the run finished (after the model is written)."""
    step, max_steps = trainer.state.global_step, cfg.training.max_steps
    export_final_model(trainer, layout.final_model)
    writer.close()
    if trainer.is_world_process_zero():
        try:
            plot_loss_curve(writer.jsonl_path, layout.loss_curve)
        except (OSError, ValueError) as err:  # e.g. max_steps < logging_steps: nothing to plot
            log.warning("no loss curve: %s", err)
    early = step < max_steps
    reason = f"early stopping (no {cfg.training.metric_for_best_model} improvement)" if early else "max_steps reached"
    mark_finished(layout, step, reason, early_stopped=early, best_metric=trainer.state.best_metric)
    return layout.final_model


def run(cfg: RecipeConfig, resume: str | None = "auto") -> Path | None:
    """Train according to cfg; returns the final export dir (None: nothing to do, or preempted after saving)."""
    rank, _, world_size = read_launch_env()
    layout = RunLayout(cfg.training.output_dir)
    record = finished_run(layout, cfg.training.max_steps)
    if record is not None:
        if rank == 0:
            print(finished_message(layout, record), flush=True)
        return None
    config, backend = check_inputs(cfg)  # nothing is written before these pass
    stream = ShardStream(
        cfg.data.train_dir, rank, world_size, cfg.data.num_workers, cfg.training.mlm_probability, cfg.training.seed
    )
    training_arguments(cfg, layout.checkpoints)  # starts torch.distributed under torchrun/accelerate
    get_logger("esm2_fa")  # now that the process group exists: INFO on rank 0 only
    start = find_resume(cfg, layout, resume, (rank, world_size))
    stream.start_batch = start.consumed
    writer = MetricsWriter(layout.output_dir, resume_step=start.step)
    with PreemptionHandler() as handler:
        preemption = PreemptionCallback(handler)
        trainer = build_trainer(cfg, config, backend, stream, start, (rank, world_size), writer, preemption)
        if start.checkpoint is not None:
            log.info("resuming from %s (step %d, data-stream batch %d per rank)", *astuple(start)[:3])
        if not train_or_restore(trainer, cfg, start, preemption):
            writer.close()
            if rank == 0:
                print(
                    f"preempted at step {trainer.state.global_step}: checkpoint saved in {layout.checkpoints}; "
                    "rerun the same command to continue",
                    flush=True,
                )
            return None
        final_dir = finish(trainer, cfg, layout, writer)
    if rank == 0:
        print(
            f"done at step {trainer.state.global_step} (best {cfg.training.metric_for_best_model} "
            f"{trainer.state.best_metric}): outputs in {layout.output_dir}: final_model/, checkpoints/, "
            "metrics.jsonl, loss_curve.png, run_finished.json",
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
    sys.exit(main())
