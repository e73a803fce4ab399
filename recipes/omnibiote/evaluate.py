"""Masked-token accuracy and perplexity of a final_model/ on held-out data, next to the same model at random init.

    python evaluate.py --model runs/sample/final_model --base_dir sample_data/encoded

A report, not a gate: the numbers show whether pretraining learned anything on the held-out split (`val/`). The
batches are the validation batches train_encoder.py uses (the same masking, seeded by batch number), so the
random-init row is the step-0 `val_loss` of a run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from biorecipes_shared import check_settings, run_cli
from data import PackedMLMBatcher, draw_batch, load_split, parse_source_weights
from errors import OmniBioteError
from model import OmniBioTA
from tokenizer import OmniTokenizer


@torch.no_grad()
def masked_token_scores(model: OmniBioTA, batches: list[dict]) -> dict[str, float]:
    """Mean cross-entropy (nats), perplexity exp(loss) and top-1 accuracy over all masked tokens of the batches."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches:
        logits = model(batch["input_ids"], batch["doc_ids"])
        selected = batch["labels"] != -100
        chosen, labels = logits[selected].float(), batch["labels"][selected]
        total_loss += float(torch.nn.functional.cross_entropy(chosen, labels, reduction="sum"))
        correct += int((chosen.argmax(-1) == labels).sum())
        count += int(selected.sum())
    loss = total_loss / count
    return {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / count, "masked_tokens": count}


def evaluate(model_dir: Path, base_dir: Path, n_batches: int, mini_batch_size: int, seed: int = 0) -> dict:
    """Scores of the trained model and of a random init of the same architecture on `base_dir/val`."""
    trained = OmniBioTA.from_pretrained(model_dir)
    tokenizer = OmniTokenizer(Path(model_dir) / "tokenizer.model")
    sources = load_split(base_dir, "val")
    batcher = PackedMLMBatcher(
        sources, parse_source_weights(None, sources), trained.config.ctx_len, mini_batch_size, tokenizer, None
    )
    batches = [draw_batch(batcher, 0, "val", index) for index in range(n_batches)]
    torch.manual_seed(seed)
    random_init = OmniBioTA(trained.config)
    return {"trained": masked_token_scores(trained, batches), "random_init": masked_token_scores(random_init, batches)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="final_model/ with tokenizer.model")
    parser.add_argument("--base_dir", type=Path, required=True, help="encoded data with a val/ split")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--mini_batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    check_settings([("--batches", args.batches, "count"), ("--mini_batch_size", args.mini_batch_size, "count")])
    scores = evaluate(args.model, args.base_dir, args.batches, args.mini_batch_size)
    print("model        loss   perplexity  accuracy")
    for name, row in scores.items():
        print(f"{name:<12} {row['loss']:.3f}  {row['perplexity']:10.1f}  {row['accuracy']:.3f}")
    print(json.dumps(scores))


if __name__ == "__main__":
    sys.exit(run_cli(main, user_errors=(OmniBioteError,)))
