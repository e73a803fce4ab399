"""`train.compile` and `train.activation_checkpointing`: same losses as the eager model and the same checkpoints
(a run that resumes across the switches is in test_train.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, tiny_overrides

from model import CurricularFace, EmbedderConfig, EmbedderWithHead, GenomeFragmentEmbedder, set_speed_switches

CONFIG = EmbedderConfig(vocab_size=66, pad_token=65, d_model=8, n_layers=2, d_state=4)


def tiny_model() -> EmbedderWithHead:
    torch.manual_seed(0)
    return EmbedderWithHead(GenomeFragmentEmbedder(CONFIG), CurricularFace(CONFIG.d_model, 5, scale=16.0))


def batches(n: int, pad: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, 65, (4, 16), generator=generator)
        if pad:  # right padding in two rows exercises the per-sequence reversal of the backward direction
            tokens[1, 11:] = CONFIG.pad_token
            tokens[3, 5:] = CONFIG.pad_token
        out.append((tokens, torch.randint(0, 5, (4,), generator=generator)))
    return out


def train_losses(model: EmbedderWithHead, data) -> list[float]:
    """fp32 AdamW steps, one per batch; returns the losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for tokens, labels in data:
        loss = F.cross_entropy(model(tokens, labels), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_activation_checkpointing_gives_identical_losses_and_weights():
    data = batches(5, pad=True)
    eager, checkpointed = tiny_model(), tiny_model()
    set_speed_switches(checkpointed.embedder, compile_blocks=False, activation_checkpointing=True)
    assert train_losses(checkpointed, data) == train_losses(eager, data)
    for (name, want), have in zip(eager.state_dict().items(), checkpointed.state_dict().values()):
        assert torch.equal(want, have), name


@pytest.mark.slow  # inductor compiles mambapy's scan and its backward: minutes on a loaded 2-core machine
def test_compiled_blocks_match_eager_over_10_steps_and_share_checkpoints():
    data = batches(10, pad=False)
    eager, compiled = tiny_model(), tiny_model()
    set_speed_switches(compiled.embedder, compile_blocks=True, activation_checkpointing=False)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints are interchangeable
    compiled.load_state_dict(eager.state_dict())
    want, have = train_losses(eager, data), train_losses(compiled, data)
    assert want[-1] < want[0]
    for step, (a, b) in enumerate(zip(want, have)):
        assert abs(a - b) <= 1e-4 * abs(a), (step, a, b)


def test_compile_and_checkpointing_must_be_booleans(gtdb_fixture, tmp_path):
    from biorecipes_shared import ConfigError
    from config import validate as check_config

    with pytest.raises(
        ConfigError, match=r"^Error merging override train.compile=maybe; Value 'maybe' is not a valid bool"
    ):
        check_config(compose_config([*tiny_overrides(gtdb_fixture, tmp_path), "train.compile=maybe"]))


def test_a_compiler_failure_is_one_line(gtdb_fixture, tmp_path, monkeypatch, capsys):
    """Where inductor cannot build (no C++ compiler, no Triton), the first compiled call raises: one line, exit 1."""
    from torch._dynamo.exc import TorchDynamoException

    import train
    from biorecipes_shared import run_cli
    from model import BiMambaBlock

    def no_compiler(self, *args):
        raise TorchDynamoException("InvalidCxxCompiler: No working C++ compiler found\n(more lines)")

    monkeypatch.setattr(BiMambaBlock, "forward", no_compiler)
    cfg = compose_config([*tiny_overrides(gtdb_fixture, tmp_path), "train.max_steps=2", "train.compile=true"])
    assert run_cli(lambda: train.run(cfg)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: train.compile=true: torch.compile failed here (InvalidCxxCompiler: No working C++ compiler found); "
        "set train.compile=false"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
