"""Pretrain Geneformer with masked-LM on tokenized cells.

    python train.py                                         # l0_sanity on the bundled sample, CPU friendly
    torchrun --nproc_per_node=8 train.py --config-name 106m data.train_path=... data.vocab_path=...
    python train.py --config-name 4b --cfg job              # print the composed config

DDP by default, FSDP2 with training.use_fsdp=true; checkpoints every save_every_n_steps into
training.checkpoint_dir/step_XXXXXXXX/, resumed automatically; the final weights go to checkpoint_dir/final_model/.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import get_scheduler
from transformers.activations import ACT2FN

from biorecipes_shared.checkpoint import (
    CheckpointError,
    export_safetensors,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from biorecipes_shared.distributed import all_reduce_mean, seed_everything, setup_distributed, teardown_distributed
from biorecipes_shared.fsdp_checkpoint import gather_full_state_dict, load_sharded_checkpoint, save_sharded_checkpoint
from biorecipes_shared.logging_utils import MetricsWriter, ThroughputMeter, get_logger, peak_memory, plot_loss_curve
from biorecipes_shared.preemption import PreemptionHandler
from config import ConfigError, config_from_argv
from data import CellDataset, MaskingCollator, check_corpus_fingerprint, check_fills_a_batch, iterate_batches
from model import BertForMaskedLM, check_te_config, geneformer_config, te, te_to_hf_state_dict
from preprocess import DataError, read_vocab

RECIPE_DIR = Path(__file__).resolve().parent
USER_ERRORS = (ConfigError, DataError, CheckpointError)
# The transformers schedules that work as make_optimizer builds and steps them (warmup + total steps, step() without
# a metric); reduce_lr_on_plateau, cosine_with_min_lr and warmup_stable_decay need arguments this recipe never passes.
LR_SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


def recipe_path(path: str) -> Path:
    """Relative paths in the config are relative to the recipe folder, wherever train.py is launched from."""
    return Path(path) if Path(path).is_absolute() else RECIPE_DIR / path


def check_config(cfg: DictConfig) -> None:
    """Refuse combinations that cannot run as asked, before any expensive work (no silent fallbacks)."""
    model, data, training = cfg.model, cfg.data, cfg.training
    for key in ("num_train_steps", "log_every_n_steps", "save_every_n_steps", "keep_last_k"):
        if training[key] < 1:
            raise ConfigError(f"training.{key}={training[key]} must be at least 1")
    if data.micro_batch_size < 1 or data.pad_to_multiple_of < 1:
        raise ConfigError("data.micro_batch_size and data.pad_to_multiple_of must be at least 1")
    if model.hidden_size % model.num_attention_heads:
        raise ConfigError(f"model.hidden_size={model.hidden_size} is not divisible by num_attention_heads")
    if data.max_seq_length > model.max_position_embeddings:
        raise ConfigError(f"data.max_seq_length={data.max_seq_length} > model.max_position_embeddings")
    if not 0 < data.mlm_probability < 1:
        raise ConfigError(f"data.mlm_probability={data.mlm_probability} must be in (0, 1)")
    if model.hidden_act not in ACT2FN:
        raise ConfigError(f"model.hidden_act={model.hidden_act!r} is unknown (e.g. relu, gelu, gelu_new)")
    if training.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"training.lr_schedule={training.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}")
    if training.lr_schedule == "constant" and training.warmup_steps:
        raise ConfigError("training.lr_schedule=constant ignores warmup_steps; use constant_with_warmup")
    if len(training.adam_betas) != 2 or not all(0 <= beta < 1 for beta in training.adam_betas):
        raise ConfigError(f"training.adam_betas={list(training.adam_betas)} must be two values in [0, 1)")
    if training.wandb_init_args:
        try:  # MetricsWriter imports wandb only after it has created output_dir: check first
            importlib.import_module("wandb")
        except ImportError as error:
            raise ConfigError(f"training.wandb_init_args is set but wandb does not import ({error})") from None
    if training.fsdp_impl not in ("torch", "megatron"):
        raise ConfigError(f"training.fsdp_impl={training.fsdp_impl!r}: use torch or megatron")
    if training.fsdp_impl == "megatron" and not training.use_fsdp:
        raise ConfigError("training.fsdp_impl=megatron needs training.use_fsdp=true")
    if training.use_fp8:
        if not torch.cuda.is_available():
            raise ConfigError("training.use_fp8=true needs a CUDA GPU with compute capability >= 8.9 (running on CPU)")
        capability = torch.cuda.get_device_capability()
        if capability < (8, 9):
            raise ConfigError(f"training.use_fp8=true needs compute capability >= 8.9 (this GPU has {capability})")
        if not model.use_te_layers:
            raise ConfigError("training.use_fp8=true needs model.use_te_layers=true (FP8 runs in Transformer Engine)")
    if model.use_te_layers:
        try:
            check_te_config(geneformer_config(2, use_te_layers=True, hidden_act=model.hidden_act))
        except ValueError as error:
            raise ConfigError(str(error)) from None


def shard_model(model: BertForMaskedLM, cfg: DictConfig, dist_ctx):
    """Wrap for data parallelism: FSDP2 per layer + root, megatron-fsdp, DDP, or nothing on one process."""
    if cfg.training.use_fsdp and cfg.training.fsdp_impl == "megatron":
        try:
            from megatron_fsdp import fully_shard_model
        except Exception as error:
            raise ConfigError(f"training.fsdp_impl=megatron: megatron_fsdp does not import ({error})") from None
        layer_type = type(model.bert.encoder["layer"][0])
        return fully_shard_model(module=model, fsdp_unit_modules=[layer_type])
    if cfg.training.use_fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder["layer"]:
            fully_shard(layer)
        return fully_shard(model)
    if dist_ctx.is_distributed:
        device_ids = [dist_ctx.device.index] if dist_ctx.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def make_optimizer(model: torch.nn.Module, cfg: DictConfig):
    """AdamW without weight decay on biases and LayerNorms (BERT practice), with warmup + decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    training = cfg.training
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=training.learning_rate,
        betas=tuple(training.adam_betas),
    )
    if training.fsdp_impl == "megatron" and training.use_fsdp:
        from megatron_fsdp import fully_shard_optimizer

        optimizer = fully_shard_optimizer(optimizer=optimizer)
    scheduler = get_scheduler(
        training.lr_schedule,
        optimizer,
        num_warmup_steps=training.warmup_steps,
        num_training_steps=training.num_train_steps,
    )
    return optimizer, scheduler


def precision_context(cfg: DictConfig, device: torch.device):
    """bf16 autocast (if asked), and around it TE's FP8 autocast (if asked; validated by check_config)."""
    stack = contextlib.ExitStack()
    if cfg.training.bf16:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
    if cfg.training.use_fp8:
        from transformer_engine.common.recipe import DelayedScaling

        fp8 = (
            te.autocast(recipe=DelayedScaling())
            if hasattr(te, "autocast")
            else te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling())
        )
        stack.enter_context(fp8)
    return stack


def resume_point(checkpoint_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from; existing but unusable checkpoints are an error, never a restart at step 0."""
    existing = sorted(checkpoint_dir.glob("step_*"))
    if not existing:
        return None
    if not resume:
        raise ConfigError(
            f"{checkpoint_dir} already holds checkpoints and training.resume_from_checkpoint=false; "
            "choose another training.output_dir (nothing is overwritten)"
        )
    latest = latest_checkpoint(checkpoint_dir)
    if latest is None:
        raise CheckpointError(f"{checkpoint_dir}: has {[p.name for p in existing]} but none is a complete checkpoint")
    return latest


def export_final_model(model: BertForMaskedLM, state_dict: dict, out_dir: Path) -> None:
    """checkpoint_dir/final_model: model.safetensors + config.json in the Hugging Face BERT layout."""
    if getattr(model.config, "use_te_layers", False):
        state_dict = te_to_hf_state_dict(state_dict)
    config = model.config.to_dict()
    config["architectures"] = ["BertForMaskedLM"]
    export_safetensors(None, config, out_dir, state_dict=state_dict)


def train(cfg: DictConfig) -> list[float]:
    """Run (or resume) training as configured; returns the losses logged by this run."""
    check_config(cfg)
    vocab = read_vocab(recipe_path(cfg.data.vocab_path))
    vocab_size = cfg.model.vocab_size or len(vocab)
    if vocab_size < len(vocab):
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than {cfg.data.vocab_path} ({len(vocab)} tokens)")
    dataset = CellDataset(recipe_path(cfg.data.train_path), vocab_size, cfg.data.max_seq_length)
    check_corpus_fingerprint(recipe_path(cfg.data.train_path), recipe_path(cfg.data.vocab_path))
    training = cfg.training
    output_dir, checkpoint_dir = recipe_path(training.output_dir), recipe_path(training.checkpoint_dir)
    resume_from = resume_point(checkpoint_dir, training.resume_from_checkpoint)

    dist_ctx = setup_distributed(seed=training.seed)
    if training.use_fsdp and not dist_ctx.is_distributed:
        raise ConfigError(
            "training.use_fsdp=true shards over several processes: launch with torchrun --nproc_per_node>1"
        )
    check_fills_a_batch(dataset, cfg.data.micro_batch_size, dist_ctx.world_size)
    log = get_logger("geneformer", dist_ctx)
    if dataset.num_truncated and dist_ctx.is_main:
        cut = f"only their first {cfg.data.max_seq_length} tokens are used"
        if "<eos>" in vocab:
            cut += " (so they lose their <eos>)"
        log.warning(
            f"{dataset.num_truncated} of {len(dataset)} cells in {dataset.path} are longer than "
            f"data.max_seq_length={cfg.data.max_seq_length}: {cut}; raise data.max_seq_length and "
            "model.max_position_embeddings to keep them"
        )
    model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k not in ("vocab_size",)}
    seed_everything(training.seed)  # identical initial weights on every rank, without a broadcast
    model = BertForMaskedLM(geneformer_config(vocab_size, **model_kwargs)).to(dist_ctx.device)
    seed_everything(training.seed + dist_ctx.rank)  # then different dropout per rank
    log.info(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(dataset)} cells")

    sharded = training.use_fsdp
    wrapped = shard_model(model, cfg, dist_ctx)
    optimizer, scheduler = make_optimizer(wrapped, cfg)
    mask_generator = torch.Generator().manual_seed(training.seed + 1000 * (dist_ctx.rank + 1))
    collator = MaskingCollator(vocab, cfg.data.mlm_probability, cfg.data.pad_to_multiple_of, mask_generator)

    step, data_state = 0, {"epoch": 0, "batch": 0}
    if resume_from is not None:
        load = load_sharded_checkpoint if sharded else load_checkpoint
        try:
            state = load(resume_from, wrapped, optimizer, scheduler, generators={"masking": mask_generator})
        except CheckpointError as error:
            if "shape mismatch" not in str(error):
                raise
            # Usually the same output_dir rerun with other model.* values: say so, since resuming is the default.
            raise CheckpointError(
                f"{error}; the model config differs from the run that saved it: use a new training.output_dir"
            ) from None
        step, data_state = state.step, state.data_state
        log.info(f"resumed from {resume_from} at step {step}; continuing with step {step + 1}")
    save = save_sharded_checkpoint if sharded else save_checkpoint

    def checkpoint(at_step: int, position: dict) -> None:
        save(
            checkpoint_dir,
            at_step,
            wrapped,
            optimizer,
            scheduler,
            data_state=position,
            generators={"masking": mask_generator},
            keep_last_k=training.keep_last_k,
        )

    batches = iterate_batches(
        dataset,
        collator,
        cfg.data.micro_batch_size,
        training.seed,
        dist_ctx.rank,
        dist_ctx.world_size,
        data_state["epoch"],
        data_state["batch"],
    )
    metrics = MetricsWriter(
        output_dir,
        dist_ctx,
        tsv_files={"loss.tsv": ["step", "loss"]},
        wandb_init_args=OmegaConf.to_container(training.wandb_init_args) if training.wandb_init_args else None,
    )
    meter, losses, preempted = ThroughputMeter(), [], False
    wrapped.train()
    with PreemptionHandler() as preemption, metrics:
        while step < training.num_train_steps:
            epoch, batch_index, batch = next(batches)
            batch = {key: value.to(dist_ctx.device, non_blocking=True) for key, value in batch.items()}
            with precision_context(cfg, dist_ctx.device):
                loss = wrapped(**batch, masked_logits_only=True).loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), training.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            meter.update(samples=batch["input_ids"].shape[0], tokens=int(batch["attention_mask"].sum()))
            position = {"epoch": epoch, "batch": batch_index + 1}
            if step % training.log_every_n_steps == 0 or step == training.num_train_steps:
                mean_loss = all_reduce_mean(loss.detach().float()).item()
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                losses.append(mean_loss)
                rates = meter.rates()
                metrics.log(
                    step,
                    loss=mean_loss,
                    lr=scheduler.get_last_lr()[0],
                    grad_norm=float(grad_norm),
                    epoch=epoch,
                    **rates,
                    **peak_memory(),
                )
                log.info(
                    f"step {step}/{training.num_train_steps}  loss {mean_loss:.4f}  "
                    f"lr {scheduler.get_last_lr()[0]:.2e}  {rates['tokens_per_s']:.0f} tokens/s"
                )
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss became {mean_loss} at step {step}")
            preempted = preemption.should_stop(dist_ctx)
            if step % training.save_every_n_steps == 0 or step == training.num_train_steps or preempted:
                checkpoint(step, position)
            if preempted:
                log.warning(f"preempted: saved step {step}; rerun the same command to resume")
                break

    if not preempted:
        full_state = gather_full_state_dict(wrapped) if sharded else unwrap_model(wrapped).state_dict()
        if dist_ctx.is_main:
            export_final_model(model, full_state, checkpoint_dir / "final_model")
            if (output_dir / "metrics.jsonl").is_file() and losses:
                plot_loss_curve(output_dir / "metrics.jsonl", output_dir / "loss_curve.png")
            log.info(f"exported {checkpoint_dir / 'final_model'}")
    teardown_distributed()
    return losses


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_argv(argv)
        if cfg is not None:
            train(cfg)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
