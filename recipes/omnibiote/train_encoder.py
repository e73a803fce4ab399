"""Train OmniBioTA with masked-language modelling on encoded DNA/RNA/protein tokens.

    torchrun --nnodes=1 --nproc_per_node=4 train_encoder.py --base_dir data/encoded --save_name omni_small \
        --n_layer 12 --n_head 12 --n_embd 768 --ctx_len 1024 --mini_batch_size 16 --batch_size 1024 \
        --lr 0.01 --token_budget 10_000_000_000

Outputs go to <out_dir>/<save_name>/: checkpoints/step_XXXXXXXX (resumed from automatically), metrics.jsonl,
log_file.txt, loss_curve.png and final/ (config.json, model.safetensors, tokenizer.model for from_pretrained).
"""

import argparse
import contextlib
import importlib.util
import math
import shutil
import sys
from pathlib import Path

import torch
from mup import MuAdamW
from torch.nn.parallel import DistributedDataParallel

from biorecipes_shared.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from biorecipes_shared.distributed import all_reduce_mean, seed_everything, setup_distributed, teardown_distributed
from biorecipes_shared.logging_utils import MetricsWriter, ThroughputMeter, get_logger, peak_memory, plot_loss_curve
from biorecipes_shared.preemption import PreemptionHandler
from data import PackedMLMBatcher, check_fingerprint, load_split, parse_source_weights
from errors import ConfigError, run_cli
from model import OmniBioTA, OmniBioTAConfig, mup_lr
from schedule import lr_multiplier, plan_training
from tokenizer import OmniTokenizer

# Architecture fields a resumed run must share with its checkpoint.
ARCHITECTURE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_embd", "ctx_len")
# Counts, sizes and frequencies that must be above 0: 0 divides by zero (ctx_len, val_batches, log_freq, n_head)
# or builds an empty model or batch.
POSITIVE_FLAGS = (
    "mini_batch_size",
    "batch_size",
    "n_head",
    "n_embd",
    "n_layer",
    "ctx_len",
    "val_batches",
    "log_freq",
    "token_budget",
    "lr",
)
# Frequencies and strengths where 0 means "off" and only a negative value is wrong.
NON_NEGATIVE_FLAGS = ("test_freq", "save_freq", "grad_clip", "weight_decay", "epsilon")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the flags of the original train_encoder.py, same names and meanings
    p.add_argument("--mini_batch_size", type=int, default=16, help="sequences per rank per micro-step")
    p.add_argument("--batch_size", type=int, default=1024, help="global batch in sequences (after the ramp)")
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--ctx_len", type=int, default=1024, help="tokens per row; at most the smallest source's tokens")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument(
        "--lr", type=float, default=1e-2, help="muP base LR, scaled by sqrt(batch_size)/32 unless --force_lr"
    )
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--epsilon", type=float, default=1e-8)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--token_budget", type=float, default=1e9, help="tokens to train on, ramp included (approx.)")
    p.add_argument("--test_freq", type=float, default=1e7, help="validate every this many tokens (0: at the end)")
    p.add_argument("--save_freq", type=float, default=1e8, help="checkpoint every this many tokens (0: at the end)")
    p.add_argument("--save_name", default="omnibiota", help="run name: outputs go to <out_dir>/<save_name>")
    p.add_argument("--disable_flash", action="store_true", help="use the plain math attention path")
    p.add_argument("--wandb_project_name", default=None, help="log to this wandb project (off when unset)")
    p.add_argument("--base_dir", required=True, help="encoded data: train/, val/ and tokenizer.model")
    p.add_argument("--force_lr", action="store_true", help="use --lr as given, without the batch-size scaling")
    # additions of this recipe
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: <base_dir>/tokenizer.model)")
    p.add_argument("--out_dir", default="runs", help="parent folder of the run folder")
    p.add_argument("--ramp_fraction", type=float, default=0.05, help="share of steps over which the batch grows")
    p.add_argument("--warmup_fraction", type=float, default=0.0, help="share of steps of linear LR warmup")
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--source_weights", default=None, help="e.g. genbank=0.8,uniprot=0.2 (default: by token count)")
    p.add_argument("--val_batches", type=int, default=8, help="mini-batches per rank in each validation")
    p.add_argument("--log_freq", type=int, default=10, help="log the training loss every this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_steps", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    return p.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Reject impossible flag values up front, before any data is read or any run folder is made."""
    for flag in POSITIVE_FLAGS:
        value = getattr(args, flag)
        if not (value > 0 and math.isfinite(value)):  # NaN fails too; an infinite budget cannot be planned
            raise ConfigError(f"--{flag} must be positive, got {value}")
    if args.ctx_len < 2:  # a window needs its modality token and at least one residue to mask
        raise ConfigError(f"--ctx_len must be at least 2, got {args.ctx_len}")
    for flag in NON_NEGATIVE_FLAGS:
        if not getattr(args, flag) >= 0:
            raise ConfigError(f"--{flag} must be 0 (off) or positive, got {getattr(args, flag)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max_steps must be positive when given, got {args.max_steps}")
    if not 0.0 <= args.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not (0.0 <= args.beta1 < 1.0 and 0.0 <= args.beta2 < 1.0):
        raise ConfigError(f"--beta1 and --beta2 must be in [0, 1), got {args.beta1} and {args.beta2}")


def check_ctx_len(ctx_len: int, sources) -> None:
    """A window longer than a source's whole token array would be mostly padding, and the ctx_len x ctx_len
    attention mask of an absurd --ctx_len (e.g. 100000) takes tens of GB before the first step."""
    smallest = min(sources, key=lambda source: source.n_tokens)
    if ctx_len > smallest.n_tokens:
        raise ConfigError(
            f"--ctx_len {ctx_len} is longer than all {smallest.n_tokens} tokens of {smallest.folder};"
            " lower --ctx_len or add data to that source"
        )


def build_optimizer(model: OmniBioTA, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    """MuAdamW; weight decay on matrices only (norm gains are not decayed)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": args.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return MuAdamW(groups, lr=lr, betas=(args.beta1, args.beta2), eps=args.epsilon)


def check_resumable(saved: dict, config: OmniBioTAConfig, checkpoint: Path) -> None:
    """A checkpoint can only continue a run with the same architecture."""
    for field in ARCHITECTURE_FIELDS:
        if saved.get(field) != getattr(config, field):
            raise ConfigError(
                f"{checkpoint}: was trained with {field}={saved.get(field)}, not {getattr(config, field)};"
                " use another --save_name or the same flags"
            )


def crossed(freq: float, before: int, after: int) -> bool:
    """True when a multiple of freq tokens lies in (before, after]: time to validate or save."""
    return freq > 0 and int(after // freq) > int(before // freq)


@torch.no_grad()
def validation_loss(model, batches, device, autocast) -> float:
    """Mean MLM loss over the fixed validation batches, averaged over ranks."""
    model.eval()
    losses = []
    for batch in batches:
        with autocast():
            losses.append(float(model(**{k: v.to(device) for k, v in batch.items()})))
    model.train()
    return float(all_reduce_mean(sum(losses) / len(losses)))


def train(args: argparse.Namespace, dist_ctx) -> Path | None:
    """The training run; returns the folder of the exported final model (None when stopped early)."""
    log = get_logger("omnibiote", dist_ctx)
    check_flags(args)
    if args.wandb_project_name and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb_project_name needs the wandb package: pip install wandb")
    base_dir = Path(args.base_dir)
    if not base_dir.is_dir():
        raise ConfigError(f"--base_dir {base_dir}: no such folder")
    tokenizer = OmniTokenizer(args.tokenizer or base_dir / "tokenizer.model")
    train_sources, val_sources = load_split(base_dir, "train"), load_split(base_dir, "val")
    check_fingerprint([*train_sources.values(), *val_sources.values()], tokenizer)
    for source in [*train_sources.values(), *val_sources.values()]:
        if source.meta["vocab_size"] != tokenizer.vocab_size:
            raise ConfigError(
                f"{source.folder}: encoded with {source.meta['vocab_size']} pieces, tokenizer has"
                f" {tokenizer.vocab_size}"
            )
    train_weights = parse_source_weights(args.source_weights, train_sources)
    val_weights = {name: weight for name, weight in train_weights.items() if name in val_sources}
    if not any(val_weights.values()):
        raise ConfigError(f"{base_dir / 'val'}: none of the training sources {sorted(train_weights)} has a val split")
    used = [train_sources[name] for name, weight in train_weights.items() if weight > 0]
    check_ctx_len(args.ctx_len, used + [val_sources[name] for name, weight in val_weights.items() if weight > 0])
    plan = plan_training(
        int(args.token_budget),
        args.batch_size,
        args.mini_batch_size,
        dist_ctx.world_size,
        args.ctx_len,
        args.ramp_fraction,
        args.warmup_fraction,
    )
    try:
        config = OmniBioTAConfig(
            vocab_size=tokenizer.vocab_size,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_embd=args.n_embd,
            ctx_len=args.ctx_len,
            dropout=args.dropout,
            pad_id=tokenizer.pad_id,
            attn_impl="math" if args.disable_flash else "auto",
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    seed_everything(args.seed)  # identical initial weights on every rank
    model = OmniBioTA(config).to(dist_ctx.device)
    seed_everything(args.seed + dist_ctx.rank)  # but a different dropout stream per rank
    lr = args.lr if args.force_lr else mup_lr(args.lr, args.batch_size)
    optimizer = build_optimizer(model, args, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(plan))
    data_generator = torch.Generator().manual_seed(args.seed * 1000 + dist_ctx.rank)
    batcher = PackedMLMBatcher(
        train_sources, train_weights, args.ctx_len, args.mini_batch_size, tokenizer, data_generator
    )
    val_generator = torch.Generator().manual_seed(12345 + dist_ctx.rank)
    val_batches = PackedMLMBatcher(
        val_sources, val_weights, args.ctx_len, args.mini_batch_size, tokenizer, val_generator
    ).fixed_batches(args.val_batches)

    run_dir = Path(args.out_dir) / args.save_name
    ckpt_dir = run_dir / "checkpoints"
    step, tokens_seen = 0, 0
    resume_from = latest_checkpoint(ckpt_dir)
    if resume_from is not None:
        try:
            state = load_checkpoint(
                resume_from, model, optimizer, scheduler, generators={"data": data_generator}, dist_ctx=dist_ctx
            )
        except RuntimeError as exc:  # CheckpointError, or weights of another architecture
            detail = " ".join(str(exc).split())[:300]
            raise ConfigError(f"{resume_from}: cannot resume this run from it ({detail})") from None
        check_resumable(state.extra.get("config", {}), config, resume_from)
        step, tokens_seen = state.step, state.data_state["tokens_seen"]
        log.info("resumed from %s at step %d (%d tokens)", resume_from, step, tokens_seen)

    ddp_model = DistributedDataParallel(model) if dist_ctx.is_distributed else model
    use_bf16 = dist_ctx.device.type == "cuda"

    # bf16 autocast on GPU; the rotary tables stay fp32 (the original's model.to(bfloat16) corrupted them)
    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    log.info(
        "model %.2fM parameters; %d steps (ramp %d, warmup %d), lr %.3g, accumulation %d x %d ranks",
        model.num_parameters() / 1e6,
        plan.total_steps,
        plan.ramp_steps,
        plan.warmup_steps,
        lr,
        plan.full_accumulation,
        dist_ctx.world_size,
    )

    saved_step = step if resume_from is not None else -1

    def checkpoint() -> None:
        nonlocal saved_step
        if saved_step == step:
            return
        saved_step = step
        save_checkpoint(
            ckpt_dir,
            step,
            model,
            optimizer,
            scheduler,
            data_state={"tokens_seen": tokens_seen},
            generators={"data": data_generator},
            extra={"config": config.to_dict()},
            dist_ctx=dist_ctx,
        )

    last_step = plan.total_steps if args.max_steps is None else min(plan.total_steps, args.max_steps)
    # the first validation runs before the run folder exists: a run that cannot even do that leaves nothing
    initial_val_loss = validation_loss(model, val_batches, dist_ctx.device, autocast) if step == 0 else None
    wandb_args = {"project": args.wandb_project_name, "name": args.save_name} if args.wandb_project_name else None
    metrics = MetricsWriter(
        run_dir, dist_ctx, tsv_files={"log_file.txt": ["step", "tokens", "loss"]}, wandb_init_args=wandb_args
    )
    meter = ThroughputMeter()
    if initial_val_loss is not None:
        metrics.log(0, tokens=0, val_loss=initial_val_loss)
    with PreemptionHandler() as preemption:
        while step < last_step:
            accumulation = plan.accumulation(step)
            step_loss = torch.zeros((), device=dist_ctx.device)
            for micro in range(accumulation):
                batch = {k: v.to(dist_ctx.device, non_blocking=True) for k, v in batcher.next_batch().items()}
                # gradients are all-reduced only on the last micro-batch of a step
                sync = micro == accumulation - 1 or not dist_ctx.is_distributed
                with contextlib.nullcontext() if sync else ddp_model.no_sync(), autocast():
                    loss = ddp_model(**batch) / accumulation
                loss.backward()
                step_loss += loss.detach()  # no GPU sync per micro-batch; read at log steps only
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_tokens = plan.step_tokens(step)
            previous_tokens, tokens_seen, step = tokens_seen, tokens_seen + step_tokens, step + 1
            meter.update(samples=step_tokens // args.ctx_len, tokens=step_tokens)

            if step % args.log_freq == 0 or step == last_step:
                loss_value = float(all_reduce_mean(step_loss.item()))
                metrics.log(
                    step,
                    tokens=tokens_seen,
                    loss=loss_value,
                    lr=scheduler.get_last_lr()[0],
                    grad_norm=float(grad_norm),
                    **meter.rates(),
                    **peak_memory(),
                )
                log.info("step %d/%d  tokens %d  loss %.4f", step, plan.total_steps, tokens_seen, loss_value)
            if crossed(args.test_freq, previous_tokens, tokens_seen) or step == plan.total_steps:
                val_loss = validation_loss(model, val_batches, dist_ctx.device, autocast)
                metrics.log(step, tokens=tokens_seen, val_loss=val_loss)
                log.info("step %d  val_loss %.4f", step, val_loss)
            if crossed(args.save_freq, previous_tokens, tokens_seen):
                checkpoint()
            if preemption.should_stop(dist_ctx):
                log.info("preempted at step %d", step)
                break
    checkpoint()
    metrics.close()
    if step < plan.total_steps:  # preempted or --max_steps: the checkpoint is the result
        log.info("stopped at step %d of %d; rerun the same command to continue", step, plan.total_steps)
        return None
    final_dir = run_dir / "final"
    if dist_ctx.is_main:
        model.save_pretrained(final_dir)
        shutil.copyfile(tokenizer.model_file, final_dir / "tokenizer.model")
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        log.info("saved %s", final_dir)
    return final_dir


def main(argv=None) -> None:
    args = parse_args(argv)
    dist_ctx = setup_distributed(seed=args.seed)
    try:
        train(args, dist_ctx)
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(run_cli(main))
