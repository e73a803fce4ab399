"""The recipe's training step: MLM loss on the masked positions, AdamW + the ESM-2 LR schedule, gradient
accumulation, evaluation, early stopping, and the two speed switches (torch.compile, activation checkpointing).

No `transformers.Trainer`: the loop (train.py) is plain PyTorch on the shared run-contract helpers, so nothing here
depends on a Trainer's private methods, which change between transformers releases. From transformers the recipe
uses only the model (`EsmForMaskedLM`: `.esm`, `.lm_head`, `gradient_checkpointing_enable`) and its config;
tests/test_transformers_contract.py fails loudly if an upgrade changes any of these.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from biorecipes_shared.distributed import all_reduce_mean
from config import RecipeConfig
from data_processing import IGNORE_INDEX
from dataset import eval_batches

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
    """Cross-entropy over masked positions from the full logits [B, L, 33] (the plain-transformers way)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
    return F.cross_entropy(
        logits.float().view(-1, logits.size(-1)),
        batch["labels"].view(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


class MaskedLMLoss(torch.nn.Module):
    """Wraps an ESM masked-LM so one forward returns the loss; DDP wraps this module.

    The LM head (dense + GELU + LayerNorm + decoder) runs only on the masked positions (about 20% of the tokens)
    instead of on every position as `EsmForMaskedLM.forward` does: the same loss, less work.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, reduction: str = "mean") -> torch.Tensor:
        """input_ids, attention_mask, labels: [B, L] int64; returns the mean (or summed) loss over masked tokens."""
        hidden = self.model.esm(input_ids, attention_mask=attention_mask)[0]  # [B, L, hidden]
        chosen = labels != IGNORE_INDEX
        logits = self.model.lm_head(hidden[chosen])  # [n_masked, vocab]
        return F.cross_entropy(logits.float(), labels[chosen], reduction=reduction)


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether this torch has a fused AdamW kernel for the device."""
    try:
        param = torch.zeros(1, device=device, requires_grad=True)
        torch.optim.AdamW([param], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameters that get weight decay: everything but biases and LayerNorm weights (as HF's Trainer does)."""
    no_decay = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for name, _ in module.named_parameters(recurse=False)
    }
    return {n for n, _ in model.named_parameters() if n not in no_decay and not n.endswith("bias")}


def make_optimizer(model: torch.nn.Module, cfg: RecipeConfig, device: torch.device):
    """(AdamW, LambdaLR with esm2_lr_lambda) over the trainable parameters of the bare model."""
    t, opt = cfg.training, cfg.training.optimizer
    decay = decay_parameter_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n in decay], "weight_decay": opt.weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]
    fused = fused_adamw_supported(device) if opt.fused is None else opt.fused
    optimizer = torch.optim.AdamW(
        groups, lr=t.learning_rate, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_epsilon, fused=fused
    )
    log.info("optimizer: AdamW (fused=%s)", fused)
    schedule = partial(esm2_lr_lambda, warmup_steps=t.warmup_steps, schedule_steps=t.schedule_steps)
    return optimizer, LambdaLR(optimizer, schedule)


def apply_speed_switches(model: torch.nn.Module, activation_checkpointing: bool, compile_scope: str | None) -> None:
    """Activation checkpointing per layer (transformers' own switch) and torch.compile, both in place.

    `Module.compile()` compiles in place, so state-dict keys stay as they are: compiled and uncompiled runs read
    each other's checkpoints. compile_scope: None (off), "blocks" (each encoder layer) or "model".
    """
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile_scope == "blocks":
        for layer in model.esm.encoder.layer:
            layer.compile()
    elif compile_scope == "model":
        model.compile()


def precision_context(mixed_precision: str, device: torch.device):
    """bf16/fp16 autocast on the device, or nothing for "no"."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Window:
    """What the loss line averages since the last log (per rank; saved in checkpoints so a resume logs the same)."""

    loss_sum: float = 0.0
    steps: int = 0
    tokens: int = 0  # real (non-padding) tokens
    positions: int = 0  # token positions computed on (real + padding)
    samples: int = 0

    def add(self, loss: float, batch: dict[str, torch.Tensor]) -> None:
        self.tokens += int(batch["attention_mask"].sum())
        self.positions += batch["attention_mask"].numel()
        self.samples += batch["attention_mask"].size(0)
        self.loss_sum += loss

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Progress:
    """The run's global state after `step` optimizer steps (identical on every rank; saved in checkpoints)."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    patience_counter: int = 0
    evaluations: list = field(default_factory=list)

    def record_evaluation(self, metric: float, greater_is_better: bool, threshold: float) -> None:
        """Update the best value and early stopping's patience as HF's EarlyStoppingCallback does."""
        better = self.best_metric is None or (
            metric > self.best_metric if greater_is_better else metric < self.best_metric
        )
        if better and (self.best_metric is None or abs(metric - self.best_metric) > threshold):
            self.patience_counter = 0
        else:
            self.patience_counter += 1
        if better:
            self.best_metric, self.best_step = metric, self.step


def train_step(wrapped, batches, optimizer, scheduler, scaler, cfg: RecipeConfig, device) -> tuple[float, float]:
    """One optimizer step over the rank's `gradient_accumulation_steps` micro-batches; (loss, grad norm) floats.

    Each micro-batch's loss is its mean over masked tokens, divided by the number of micro-batches.
    """
    t = cfg.training
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
        with sync:
            with precision_context(t.mixed_precision, device):
                loss = wrapped(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}) / len(batches)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), t.gradient_clipping)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total), float(grad_norm)


def evaluate(wrapped, cfg: RecipeConfig, rank: int, world_size: int, device) -> dict[str, float]:
    """Token-weighted MLM loss over the whole val dir, each rank taking every world_size-th batch."""
    was_training = wrapped.training
    wrapped.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), precision_context(cfg.training.mixed_precision, device):
        for batch in eval_batches(cfg.data.val_dir, rank, world_size, cfg.training.mlm_probability):
            batch = {k: v.to(device) for k, v in batch.items()}
            totals[0] += wrapped(**batch, reduction="sum").item()
            totals[1] += int((batch["labels"] != IGNORE_INDEX).sum())
    wrapped.train(was_training)
    loss_sum, n_masked = all_reduce_mean(totals).tolist()  # a mean of sums keeps the ratio of sums
    loss = loss_sum / max(n_masked, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def metric_key(name: str) -> str:
    """training.metric_for_best_model as a key of evaluate()'s result ("loss" means eval_loss, as in HF)."""
    return name if name.startswith("eval_") else f"eval_{name}"
