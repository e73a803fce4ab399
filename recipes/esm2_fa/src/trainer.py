"""The recipe's HF Trainer: MLM loss, sharded evaluation, AdamW + ESM-2 LR schedule, contract checkpoints; callbacks.

`EsmMlmTrainer` keeps HF's training loop and replaces how checkpoints are written (hf_checkpoint.py: complete or
absent) and how the best one is found again. `PreemptionCallback` turns SIGTERM/SIGUSR1 into "save now and stop";
`MetricsCallback` mirrors HF's logs into metrics.jsonl.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, TrainingArguments

from biorecipes_shared.checkpoint import MANIFEST, PreemptionHandler
from biorecipes_shared.distributed import all_reduce_mean
from biorecipes_shared.logging_utils import MetricsWriter, ThroughputMeter
from config import RecipeConfig
from data_processing import IGNORE_INDEX
from dataset import ShardStream, eval_batches, make_train_loader
from hf_checkpoint import save_trainer_checkpoint, step_dir

log = logging.getLogger("esm2_fa")


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


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether this torch has a fused AdamW kernel for the device."""
    try:
        param = torch.zeros(1, device=device, requires_grad=True)
        torch.optim.AdamW([param], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


class EsmMlmTrainer(Trainer):
    """Trainer with the recipe's streaming loader, loss, sharded evaluation, AdamW, LR schedule and checkpoints.

    `loss_window`: (loss sum, step of the last log) restored from the checkpoint, so the first loss logged after a
    resume averages the same steps as in an uninterrupted run (HF would restart its running sum at zero).
    """

    def __init__(
        self,
        *args,
        train_stream: ShardStream,
        recipe: RecipeConfig,
        world: tuple[int, int],
        loss_window: tuple[float, int] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.train_stream, self.recipe = train_stream, recipe
        self.rank, self.world_size = world
        self.meter = ThroughputMeter()
        self._pending_loss_window = loss_window
        self._running_loss: torch.Tensor | None = None

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

    def _maybe_log_save_evaluate(self, tr_loss, *args, **kwargs):
        if self._pending_loss_window is not None:  # first step after a resume: add the steps logged-to-be
            loss_sum, last_logged = self._pending_loss_window
            self._pending_loss_window = None
            tr_loss += torch.tensor(loss_sum, dtype=tr_loss.dtype, device=tr_loss.device)
            self._globalstep_last_logged = last_logged
        self._running_loss = tr_loss
        return super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        t = self.recipe.training
        stream_state = {
            "batches_consumed_per_rank": self.state.global_step * t.gradient_accumulation_steps,
            "world_size": self.world_size,
            "num_workers": max(1, self.recipe.data.num_workers),
            "seed": t.seed,
        }
        running = self._running_loss
        loss_window = {
            "loss_sum": float(running.item()) if running is not None else 0.0,
            "last_logged_step": self._globalstep_last_logged,
        }
        save_trainer_checkpoint(self, stream_state, loss_window)

    def _load_best_model(self):
        # trainer_state.json records the best checkpoint's path as it was named then; find it by step instead.
        best = self.state.best_global_step
        path = step_dir(Path(self.args.output_dir), best) if best else None
        if path is None or not (path / MANIFEST).is_file():
            log.warning("best checkpoint (step %s) is not on disk: keeping the last weights", best)
            return
        self.state.best_model_checkpoint = str(path)
        super()._load_best_model()

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


class PreemptionCallback(TrainerCallback):
    """SIGTERM/SIGUSR1 (SLURM's warning) on any rank: save a checkpoint at the end of this step and stop."""

    def __init__(self, handler: PreemptionHandler):
        self.handler = handler
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.handler.should_stop():  # an all-reduce: every rank stops at the same step
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


class MetricsCallback(TrainerCallback):
    """Mirrors Trainer logs to metrics.jsonl (biorecipes_shared) and prints one readable line per log."""

    def __init__(self, writer: MetricsWriter, meter_source: EsmMlmTrainer | None = None):
        self.writer, self.trainer = writer, meter_source

    def on_log(self, args, state, control, logs=None, **kwargs):
        # HF's `epoch` counts steps / max_steps over an endless stream: meaningless here, and it changes on resume.
        numbers = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float)) and k != "epoch"}
        if "train_runtime" in numbers:  # HF's per-invocation summary: not a step record, differs on resume
            return
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


def training_arguments(cfg: RecipeConfig, checkpoints_dir: str | Path) -> TrainingArguments:
    """Map the recipe's training section onto HF TrainingArguments (checkpoints go to `checkpoints_dir`)."""
    t = cfg.training
    return TrainingArguments(
        output_dir=str(checkpoints_dir),
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
        save_total_limit=t.save_total_limit or None,
        logging_steps=t.logging_steps,
        load_best_model_at_end=t.load_best_model_at_end,
        metric_for_best_model=t.metric_for_best_model,
        greater_is_better=t.greater_is_better,
        seed=t.seed,
        report_to=[] if t.report_to == "none" else [t.report_to],
        ignore_data_skip=True,  # the stream skips by itself (without reading) from stream_state.json
        restore_callback_states_from_checkpoint=True,  # early stopping's patience counter survives a resume
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        accelerator_config={"split_batches": False, "dispatch_batches": False},
        save_safetensors=True,
    )
