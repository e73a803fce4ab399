"""Masked-token accuracy and perplexity of a model folder on a held-out protein FASTA, against random init.

    python src/evaluate.py --model outputs/tiny_cpu/final_model --fasta sample_data/val.fasta

Both models see the same masks (BERT-style, data.mask_tokens, one seeded generator per batch). Perplexity is
exp(mean cross-entropy over masked positions); accuracy is the share of masked positions whose arg-max token is
the original residue. Prints a small table and one JSON line. A report figure, not a gate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from biorecipes_shared import run_cli
from data import mask_tokens
from data_processing import IGNORE_INDEX, FastaError, pack_batches
from embed import check_model_dir, pad_batch, read_proteins
from model import ModelConfigError, build_model, esm2_config, load_pretrained


@torch.no_grad()
def masked_lm_scores(model, pieces, mlm_probability: float, seed: int, token_budget: int) -> dict[str, float]:
    """{loss, perplexity, accuracy, masked} over all pieces; masks depend only on (seed, batch number)."""
    loss_sum, correct, masked = 0.0, 0, 0
    for batch_no, batch in enumerate(pack_batches([len(p.tokens) for p in pieces], token_budget)):
        input_ids, attention_mask, _ = pad_batch([pieces[i] for i in batch])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_no)
        inputs = mask_tokens({"input_ids": input_ids, "attention_mask": attention_mask}, mlm_probability, generator)
        logits = model(input_ids=inputs["input_ids"], attention_mask=attention_mask)["logits"].float()
        labels = inputs["labels"]
        chosen = labels != IGNORE_INDEX
        loss_sum += F.cross_entropy(logits[chosen], labels[chosen], reduction="sum").item()
        correct += int((logits[chosen].argmax(-1) == labels[chosen]).sum())
        masked += int(chosen.sum())
    loss = loss_sum / max(masked, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": correct / max(masked, 1),
        "masked": masked,
    }


def evaluate(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    model_dir = Path(args.model)
    check_model_dir(model_dir)
    _, _, pieces = read_proteins(Path(args.fasta), args.max_aa_length)
    trained = load_pretrained(model_dir, attention="eager").eval()
    torch.manual_seed(args.seed)
    random_init = build_model(esm2_config(str(model_dir)), "eager", for_training=False).eval()
    results = {
        name: masked_lm_scores(model, pieces, args.mlm_probability, args.seed, args.token_budget)
        for name, model in (("trained", trained), ("random_init", random_init))
    }
    print(f"{'model':<12} {'masked acc':>10} {'perplexity':>10} {'loss':>8}  ({results['trained']['masked']} masked)")
    for name, r in results.items():
        print(f"{name:<12} {r['accuracy']:>10.4f} {r['perplexity']:>10.3f} {r['loss']:>8.4f}")
    print(json.dumps({"model": str(model_dir), "fasta": args.fasta, **results}), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="final_model/ or a transformers ESM-2 folder")
    parser.add_argument("--fasta", required=True, help="held-out proteins, e.g. sample_data/val.fasta")
    parser.add_argument("--mlm_probability", type=float, default=0.15)
    parser.add_argument("--max_aa_length", type=int, default=1022)
    parser.add_argument("--token_budget", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run_cli(lambda: evaluate(args) and None, user_errors=(FastaError, ModelConfigError))


if __name__ == "__main__":
    sys.exit(main())
