"""ESM-2 masked-LM pretraining with HF Trainer + accelerate on token-budget shards.

    accelerate launch src/train.py --train_dir data/train --val_dir data/val
    torchrun --nproc_per_node=8 src/train.py --train_dir data/train --val_dir data/val training.max_steps=1000
    python src/train.py --config src/config_tiny_cpu.yaml --train_dir ... --val_dir ...   # one CPU process

Trailing `section.key=value` arguments override the YAML config. `--resume_from_checkpoint latest` continues the
newest `checkpoint-N/` in the output dir, including the position in the training data stream.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import is_tensorboard_available, is_wandb_available
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from biorecipes_shared.distributed import all_reduce_mean, read_launch_env, teardown_distributed
from biorecipes_shared.logging_utils import MetricsWriter, ThroughputMeter, get_logger, plot_loss_curve
from config import ConfigError, ModelConfig, RecipeConfig, load_config
from data_processing import IGNORE_INDEX, PACKING_FILE, read_packing
from dataset import DataDirError, ShardStream, check_data_fingerprints, check_shards, eval_batches, make_train_loader
from model import (
    ModelConfigError,
    build_model,
    check_attention_dropout,
    esm2_config,
    resolve_attention,
    save_tokenizer,
)

STREAM_STATE_FILE = "stream_state.json"
log = get_logger("esm2_fa")


class ResumeError(ValueError):
    """The checkpoint to resume from is missing or was written by an incompatible run."""


def esm2_lr_lambda(step: int, warmup_steps: int, schedule_steps: int, floor: float = 0.1) -> float:
    """LR multiplier: linear 0 -> 1 over warmup_steps, cosine 1 -> floor until schedule_steps, then flat floor."""
    if step < warmup_steps:
        return step / warmup_steps
    if step >= schedule_steps:
        return floor
    progress = (step - warmup_steps) / max(1, schedule_steps - warmup_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def masked_lm_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over masked positions; works for faesm (dict output) and transformers (ModelOutput)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
    return F.cross_entropy(
        logits.float().view(-1, logits.size(-1)),
        batch["labels"].view(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


class EsmMlmTrainer(Trainer):
    """Trainer with the recipe's streaming loader, loss, sharded evaluation, AdamW and LR schedule."""

    def __init__(self, *args, train_stream: ShardStream, recipe: RecipeConfig, world: tuple[int, int], **kwargs):
        super().__init__(*args, **kwargs)
        self.train_stream, self.recipe = train_stream, recipe
        self.rank, self.world_size = world
        self.meter = ThroughputMeter()

    def get_train_dataloader(self):
        # Not passed through accelerator.prepare: the stream is already split per rank and must not be re-split.
        return make_train_loader(self.train_stream, self.recipe.data.num_workers)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.meter.update(samples=inputs["input_ids"].size(0), tokens=int(inputs["attention_mask"].sum()))
        return masked_lm_loss(model, inputs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Token-weighted MLM loss over the whole val dir, each rank taking every world_size-th batch."""
        model = self.model
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad(), self.autocast_smart_context_manager():
            for batch in eval_batches(
                self.recipe.data.val_dir, self.rank, self.world_size, self.recipe.training.mlm_probability
            ):
                batch = self._prepare_inputs(batch)
                totals[0] += masked_lm_loss(model, batch, reduction="sum").item()
                totals[1] += int((batch["labels"] != IGNORE_INDEX).sum())
        model.train(was_training)
        loss_sum, n_masked = all_reduce_mean(totals).tolist()  # a mean of sums keeps the ratio of sums
        loss = loss_sum / max(n_masked, 1.0)
        metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_perplexity": math.exp(min(loss, 50.0))}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save_checkpoint(self, model, trial):
        # transformers 4.53 records the best checkpoint only if checkpoint-N/ already exists when a rank looks;
        # ranks other than 0 can look before rank 0 created it, then skip the end-of-training barrier that rank 0
        # enters and the job deadlocks. Creating the dir on every rank first removes the race.
        step_dir = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        step_dir.mkdir(parents=True, exist_ok=True)
        super()._save_checkpoint(model, trial)

    def create_optimizer(self):
        if self.optimizer is None:
            opt_cfg = self.recipe.training.optimizer
            decay = set(self.get_decay_parameter_names(self.model))
            params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in params if n in decay], "weight_decay": opt_cfg.weight_decay},
                {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
            ]
            fused = opt_cfg.fused
            if fused is None:
                fused = fused_adamw_supported(self.args.device)
            self.optimizer = torch.optim.AdamW(
                groups,
                lr=self.args.learning_rate,
                betas=(opt_cfg.adam_beta1, opt_cfg.adam_beta2),
                eps=opt_cfg.adam_epsilon,
                fused=fused,
            )
            log.info("optimizer: AdamW (fused=%s)", fused)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            t = self.recipe.training
            schedule = partial(esm2_lr_lambda, warmup_steps=t.warmup_steps, schedule_steps=t.schedule_steps)
            self.lr_scheduler = LambdaLR(optimizer or self.optimizer, schedule)
        return self.lr_scheduler


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether this torch has a fused AdamW kernel for the device."""
    try:
        param = torch.zeros(1, device=device, requires_grad=True)
        torch.optim.AdamW([param], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


class StreamStateCallback(TrainerCallback):
    """Writes the data-stream position into every checkpoint so a resume continues where the run stopped."""

    def __init__(self, world_size: int, num_workers: int, seed: int):
        self.layout = {"world_size": world_size, "num_workers": max(1, num_workers), "seed": seed}

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            consumed = state.global_step * args.gradient_accumulation_steps
            (ckpt / STREAM_STATE_FILE).write_text(json.dumps({"batches_consumed_per_rank": consumed, **self.layout}))


class MetricsCallback(TrainerCallback):
    """Mirrors Trainer logs to metrics.jsonl (biorecipes_shared) and prints one readable line per log."""

    def __init__(self, writer: MetricsWriter, meter_source: EsmMlmTrainer | None = None):
        self.writer, self.trainer = writer, meter_source

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if "loss" in numbers and self.trainer is not None:
            numbers.update({f"{k}_rank0": v for k, v in self.trainer.meter.rates().items()})
        self.writer.log(state.global_step, **numbers)
        if "loss" in numbers:
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  tokens/s %.0f",
                state.global_step,
                state.max_steps,
                numbers["loss"],
                numbers.get("learning_rate", float("nan")),
                numbers.get("tokens_per_s_rank0", float("nan")),
            )
        elif "eval_loss" in numbers:
            log.info("step %d  eval_loss %.4f", state.global_step, numbers["eval_loss"])


def training_arguments(cfg: RecipeConfig, output_dir: str) -> TrainingArguments:
    """Map the recipe's training section onto HF TrainingArguments."""
    t = cfg.training
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=1,  # batches come pre-built from the shards (token budget)
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.optimizer.weight_decay,
        warmup_steps=t.warmup_steps,
        max_grad_norm=t.gradient_clipping,
        bf16=t.mixed_precision == "bf16",
        fp16=t.mixed_precision == "fp16",
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        load_best_model_at_end=t.load_best_model_at_end,
        metric_for_best_model=t.metric_for_best_model,
        greater_is_better=t.greater_is_better,
        seed=t.seed,
        report_to=[] if t.report_to == "none" else [t.report_to],
        ignore_data_skip=True,  # the stream skips by itself (without reading) from stream_state.json
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        accelerator_config={"split_batches": False, "dispatch_batches": False},
        save_safetensors=True,
    )


def resolve_resume(resume: str | None, output_dir: str, world_size: int, num_workers: int) -> tuple[str | None, int]:
    """(checkpoint path, batches already consumed per rank) for --resume_from_checkpoint (a path or `latest`)."""
    if not resume:
        return None, 0
    if resume == "latest":
        found = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if found is None:
            raise ResumeError(f"no checkpoint-N dir in {output_dir} to resume from")
        ckpt = Path(found)
    else:
        ckpt = Path(resume)
    if not (ckpt / "trainer_state.json").is_file():
        raise ResumeError(f"{ckpt}: not a Trainer checkpoint (trainer_state.json missing)")
    state_file = ckpt / STREAM_STATE_FILE
    if not state_file.is_file():
        raise ResumeError(f"{ckpt}: {STREAM_STATE_FILE} missing; cannot restore the data-stream position")
    state = json.loads(state_file.read_text())
    if (state["world_size"], state["num_workers"]) != (world_size, max(1, num_workers)):
        raise ResumeError(
            f"{ckpt} was written by {state['world_size']} ranks x {state['num_workers']} workers; resuming with "
            f"{world_size} x {max(1, num_workers)} would read a different data stream"
        )
    return str(ckpt), int(state["batches_consumed_per_rank"])


def export_final_model(trainer: EsmMlmTrainer, out_dir: Path) -> None:
    """save_pretrained (safetensors) + tokenizer into out_dir, written under a temp name and then renamed."""
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        save_tokenizer(tmp)
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        config["architectures"] = ["EsmForMaskedLM"]  # save_pretrained wrote faesm's class; the weights are the same
        config_file.write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the export stays pickle-free
        if out_dir.exists():
            shutil.rmtree(out_dir)  # the previous export of this same run (resume): replaced as a whole
        tmp.rename(out_dir)


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


def run(cfg: RecipeConfig, resume: str | None = None) -> Path:
    """Train according to cfg; returns the final export dir."""
    rank, _, world_size = read_launch_env()
    t, m = cfg.training, cfg.model
    # Every check on user input runs before anything is written, so a refused run leaves no output dir behind.
    if Path(t.output_dir).exists() and not Path(t.output_dir).is_dir():
        raise ConfigError(f"training.output_dir {t.output_dir} exists and is not a directory")
    check_report_to(t.report_to)
    check_shards(cfg.data.val_dir, "val")
    ckpt, consumed = resolve_resume(resume, t.output_dir, world_size, cfg.data.num_workers)
    stream = ShardStream(
        cfg.data.train_dir, rank, world_size, cfg.data.num_workers, t.mlm_probability, t.seed, start_batch=consumed
    )
    check_packing(cfg.data.train_dir, "train", m)
    check_packing(cfg.data.val_dir, "val", m)
    check_data_fingerprints({"train": cfg.data.train_dir, "val": cfg.data.val_dir}, m)
    config = esm2_config(m.model_name, m.max_position_embeddings, m.hidden_dropout_prob, m.attention_probs_dropout_prob)
    backend = resolve_attention(m.attention)
    check_attention_dropout(config, backend, m.attention)
    args = training_arguments(cfg, t.output_dir)  # initialises torch.distributed under torchrun/accelerate
    get_logger("esm2_fa")  # now that the process group exists: INFO on rank 0 only
    set_seed(t.seed)  # identical initial weights on every rank
    local_weights = Path(m.model_name) / "model.safetensors"
    model = build_model(config, backend, weights=local_weights if local_weights.is_file() else None)
    for param in model.esm.contact_head.parameters():  # not used by MLM; frozen so DDP sees no unused grads
        param.requires_grad_(False)
    callbacks = [StreamStateCallback(world_size, cfg.data.num_workers, t.seed)]
    if t.early_stopping.enabled:
        callbacks.append(EarlyStoppingCallback(t.early_stopping.patience, t.early_stopping.threshold))
    trainer = EsmMlmTrainer(
        model=model,
        args=args,
        train_dataset=stream,
        eval_dataset=stream,  # placeholder: evaluate() reads the val shards itself
        callbacks=callbacks,
        train_stream=stream,
        recipe=cfg,
        world=(rank, world_size),
    )
    trainer.remove_callback(PrinterCallback)
    writer = MetricsWriter(t.output_dir)
    trainer.add_callback(MetricsCallback(writer, trainer))
    if consumed:
        log.info("resuming from %s at data-stream batch %d per rank", ckpt, consumed)
    trainer.train(resume_from_checkpoint=ckpt)
    final_dir = Path(t.output_dir) / "final_model"
    export_final_model(trainer, final_dir)
    writer.close()
    if trainer.is_world_process_zero():
        try:
            plot_loss_curve(writer.jsonl_path, Path(t.output_dir) / "loss_curve.png")
        except (OSError, ValueError) as err:  # e.g. max_steps < logging_steps: nothing to plot
            log.warning("no loss curve: %s", err)
        log.info("final model (best eval_loss %s) saved to %s", trainer.state.best_metric, final_dir)
    return final_dir


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: user errors print one `error:` line and exit 1."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: src/config.yaml)")
    parser.add_argument("--train_dir", help="shards from data_processing.py (overrides data.train_dir)")
    parser.add_argument("--val_dir", help="validation shards (overrides data.val_dir)")
    parser.add_argument("--output_dir", help="checkpoints, metrics and final_model/ (overrides training.output_dir)")
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N dir, or `latest`")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=1000")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    overrides += [f"data.train_dir={args.train_dir}"] if args.train_dir else []
    overrides += [f"data.val_dir={args.val_dir}"] if args.val_dir else []
    overrides += [f"training.output_dir={args.output_dir}"] if args.output_dir else []
    try:
        cfg = load_config(args.config, overrides)
        run(cfg, args.resume_from_checkpoint)
    except (ConfigError, DataDirError, ModelConfigError, ResumeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    teardown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
