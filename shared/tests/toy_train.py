"""A tiny training loop that uses every part of biorecipes_shared; the tests run it as a fresh process.

python toy_train.py --output-dir D --steps 20 [--stop-after 10] [--resume] [--fsdp] [--sleep 0.1] [--save-every 3]
D holds the shared run layout (checkpoints/, metrics.jsonl, final_model/, run_finished.json), driven by
`TrainingRun`. --resume follows the run contract: the newest valid checkpoint if any, else a fresh start; a finished
run exits 0. Without it the run starts fresh and refuses a folder that already holds checkpoints.
"""

from __future__ import annotations

# isort: off
import biorecipes_shared.stop_signals  # noqa: F401  (first: a SIGTERM during the imports below sets a flag)

# isort: on
import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn

from biorecipes_shared.checkpoint import export_safetensors
from biorecipes_shared.distributed import all_reduce_mean, seed_everything, setup_distributed, teardown_distributed
from biorecipes_shared.fsdp_checkpoint import gather_full_state_dict
from biorecipes_shared.logging_utils import MetricsWriter, get_logger
from biorecipes_shared.run import check_settings, run_cli
from biorecipes_shared.training_run import TrainingRun


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--setup-sleep", type=float, default=0.0, help="seconds of pretend set-up before the loop")
    parser.add_argument("--save-sleep", type=float, default=0.0, help="seconds a save takes longer (signal tests)")
    return parser.parse_args()


def build(args, dist_ctx) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    seed_everything(1234)  # identical initial weights on every rank (FSDP2 does not broadcast)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    elif dist_ctx.is_distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.05 * step))
    return model, optimizer, scheduler


def train(args, dist_ctx, log, run: TrainingRun, model, optimizer, scheduler) -> int:
    """The loop: step, log, checkpoint when the run says so or at --stop-after; returns the last step."""
    data_gen = torch.Generator().manual_seed(7)
    inputs = torch.randn(96, 8, generator=data_gen)
    targets = inputs.sum(dim=1, keepdim=True) + 0.1 * torch.randn(96, 1, generator=data_gen)
    batch_size = 8
    shuffle_gen = torch.Generator().manual_seed(99)  # the sampler's own generator, saved in checkpoints
    data = {"epoch": 0, "next_batch": 0, "order": torch.randperm(len(inputs), generator=shuffle_gen)}
    run.register(model, optimizer, scheduler, data_state=lambda: data, generators={"shuffle": shuffle_gen})
    resumed = run.resume()
    if resumed is not None:
        data = resumed.data_state
        log.info("resumed at step %d", run.step)
    metrics = MetricsWriter(run.layout.output_dir, dist_ctx, resume_step=run.step)
    print("setting up", flush=True)
    time.sleep(args.setup_sleep)
    with run:
        for step in range(run.step + 1, args.steps + 1):
            order = data["order"][dist_ctx.rank :: dist_ctx.world_size]
            start = data["next_batch"] * batch_size
            index = order[start : start + batch_size]
            loss = nn.functional.mse_loss(model(inputs[index]), targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            data["next_batch"] += 1
            if data["next_batch"] * batch_size >= len(order):
                order = torch.randperm(len(inputs), generator=shuffle_gen)
                data = {"epoch": data["epoch"] + 1, "next_batch": 0, "order": order}
            metrics.log(step, loss=all_reduce_mean(loss.detach()).item(), lr=scheduler.get_last_lr()[0])
            print(f"step {step}", flush=True)
            time.sleep(args.sleep)
            stop_here = args.stop_after is not None and step == args.stop_after
            if run.should_save(step) or stop_here:
                print(f"saving {step}", flush=True)
                time.sleep(args.save_sleep)
                run.save(step)
            if run.stopped or stop_here:
                log.info("saved checkpoint at step %d", step)
                break
    metrics.close()
    return run.step


def main() -> None:
    args = parse_args()
    check_settings([("--steps", args.steps, "positive")])
    run = TrainingRun(
        args.output_dir, max_steps=args.steps, save_every=args.save_every, resume="auto" if args.resume else "none",
        sharded=args.fsdp,
    )  # fmt: skip
    if args.resume and run.finished_message():
        print(run.finished_message(), flush=True)
        return
    dist_ctx = setup_distributed(seed=0)
    log = get_logger("toy", dist_ctx)
    if dist_ctx.is_distributed:  # the collective helpers must agree across ranks
        assert abs(all_reduce_mean(float(dist_ctx.rank)) - (dist_ctx.world_size - 1) / 2) < 1e-12
    model, optimizer, scheduler = build(args, dist_ctx)
    step = train(args, dist_ctx, log, run, model, optimizer, scheduler)
    if step >= args.steps:
        full_state = gather_full_state_dict(model) if args.fsdp else None
        run.finish(lambda folder: export_safetensors(model, {"layers": 2}, folder, state_dict=full_state))
    teardown_distributed()


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
