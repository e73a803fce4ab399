"""training.compile and training.activation_checkpointing: the same losses as without, the same checkpoints."""

import pytest
import torch

from data import mask_tokens
from model import MaskedLMLoss, apply_speed_switches, build_model, esm2_config

STEPS = 10


def fixed_batches(rows: int = 4, length: int = 48) -> list[dict[str, torch.Tensor]]:
    """STEPS masked batches of one shape (one compiled graph), the last rows padded."""
    generator = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(4, 24, (rows, length), generator=generator)
        ids[:, 0], ids[:, -1] = 0, 2
        ids[-1, length // 2 :] = 1
        ids[-1, length // 2 - 1] = 2
        batches.append(mask_tokens({"input_ids": ids, "attention_mask": (ids != 1).long()}, 0.2, generator))
    return batches


def train_losses(activation_checkpointing: bool = False, compile_scope: str | None = None):
    """Losses of STEPS AdamW steps of the tiny model (fp32, dropout 0) from one seed; and the model."""
    torch.manual_seed(0)
    model = build_model(esm2_config("esm2_tiny"), "sdpa")
    apply_speed_switches(model, activation_checkpointing, compile_scope)
    wrapped = MaskedLMLoss(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for batch in fixed_batches():
        loss = wrapped(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


def test_activation_checkpointing_gives_the_same_losses():
    plain, _ = train_losses()
    checkpointed, model = train_losses(activation_checkpointing=True)
    assert model.is_gradient_checkpointing
    assert checkpointed == pytest.approx(plain, rel=1e-6)
    assert plain[-1] < plain[0]  # it did train


@pytest.mark.slow
def test_compile_matches_eager_over_10_steps_and_keeps_the_checkpoint_keys():
    plain, plain_model = train_losses()
    compiled, compiled_model = train_losses(compile_scope="blocks")
    assert compiled == pytest.approx(plain, rel=1e-4)
    assert list(compiled_model.state_dict()) == list(plain_model.state_dict())  # no `_orig_mod.` prefixes
    compiled_model.load_state_dict(plain_model.state_dict())  # each reads the other's checkpoint
    plain_model.load_state_dict(compiled_model.state_dict())


def test_whole_model_compile_keeps_the_checkpoint_keys():
    plain = build_model(esm2_config("esm2_tiny"), "sdpa")
    compiled = build_model(esm2_config("esm2_tiny"), "sdpa")
    apply_speed_switches(compiled, False, "model")  # compiles lazily, at the first call: nothing runs here
    assert list(compiled.state_dict()) == list(plain.state_dict())
    compiled.load_state_dict(plain.state_dict())
