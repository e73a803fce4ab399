"""muP coordinate check: mean |activation| of every layer after a few Adam steps, across widths.

    python coord_check.py            # prints a table for muP and for the standard parametrisation

Under muP the numbers stay about flat as the width grows; under the standard parametrisation they grow with width,
which is why a learning rate tuned on a small model would blow up a large one. Written by hand because
`mup.coord_check` expects an (input, label) loader and a logits loss, while OmniBioTA computes its masked loss itself.
"""

import torch
from mup import MuAdamW

from model import OmniBioTA, OmniBioTAConfig


def coord_check(
    widths,
    use_mup: bool,
    n_steps: int = 4,
    lr: float = 1e-2,
    n_layer: int = 2,
    n_head: int = 4,
    vocab_size: int = 64,
    ctx_len: int = 32,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """{width: {module name: mean |output| at the last step}} for models trained n_steps on one fixed batch."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(8, vocab_size, (batch_size, ctx_len), generator=generator)
    labels = torch.where(torch.rand(input_ids.shape, generator=generator) < 0.15, input_ids, -100)
    results = {}
    for width in widths:
        torch.manual_seed(seed)
        config = OmniBioTAConfig(
            vocab_size=vocab_size,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=width,
            ctx_len=ctx_len,
            mup=use_mup,
            attn_impl="sdpa",
        )
        model = OmniBioTA(config)
        optimizer = MuAdamW(model.parameters(), lr=lr)
        watched = {"embedding": model.tok_emb, "logits": model.lm_head}
        for index, block in enumerate(model.blocks):
            watched.update({f"block{index}.attn": block.attn, f"block{index}.mlp": block.mlp, f"block{index}": block})
        sizes: dict[str, float] = {}
        hooks = [
            module.register_forward_hook(
                lambda _m, _i, out, name=name, sizes=sizes: sizes.__setitem__(name, out.abs().mean().item())
            )
            for name, module in watched.items()
        ]
        masked_ids = input_ids.masked_fill(labels != -100, 3)
        for _ in range(n_steps):
            loss = model(masked_ids, labels=labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            model(masked_ids, labels=labels)  # measure after the last update
        for hook in hooks:
            hook.remove()
        results[width] = dict(sizes)
    return results


def growth(results: dict) -> dict[str, float]:
    """Per module: mean |activation| at the widest width divided by that at the narrowest."""
    narrow, wide = results[min(results)], results[max(results)]
    return {name: wide[name] / max(narrow[name], 1e-12) for name in narrow}


if __name__ == "__main__":
    widths = [64, 128, 256, 512]
    for use_mup in (True, False):
        results = coord_check(widths, use_mup)
        print(("muP" if use_mup else "standard parametrisation") + ": mean |activation| after 4 Adam steps")
        print("module".ljust(14) + "".join(f"{w:>9}" for w in widths) + "   growth")
        for name, ratio in growth(results).items():
            print(name.ljust(14) + "".join(f"{results[w][name]:9.3f}" for w in widths) + f"{ratio:8.2f}x")
