"""convert_original.py: an original-layout model (built here from the original's published formulas: interleaved
rotary, its special ids, MuReadout with its own base shapes) saved the original's way gives the same logits after
conversion; a pickle that tries to run code is refused in one line without running it."""

import dataclasses
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from mup import MuReadout, set_base_shapes
from torch import nn

from biorecipes_shared import run_cli
from convert_original import id_order, main, original_to_converted_ids
from errors import OmniBioteError
from model import OmniBioTA


@dataclasses.dataclass
class OriginalConfig:
    block_size: int = 32
    vocab_size: int = 40
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 16
    dropout: float = 0.1
    bias: bool = False


class OriginalNorm(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


def interleaved_rotary(x, freqs_cis):
    """Rotate channel pairs (2i, 2i+1) as complex numbers: x (B, T, H, D), freqs_cis (T, D/2) complex."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = pairs * freqs_cis[None, :, None, :]
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class OriginalAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=False)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=False)
        self.n_head, self.n_embd = c.n_head, c.n_embd
        head_dim = c.n_embd // c.n_head
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(c.block_size).float(), inv_freq)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles))  # complex, as the original

    def forward(self, x):
        batch, seq, width = x.shape
        q, k, v = (t.view(batch, seq, self.n_head, -1) for t in self.c_attn(x).split(self.n_embd, dim=2))
        q, k = interleaved_rotary(q, self.freqs_cis[:seq]), interleaved_rotary(k, self.freqs_cis[:seq])
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=8 / self.n_embd)
        return self.c_proj(y.transpose(1, 2).reshape(batch, seq, width))


class OriginalMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=False)

    def forward(self, x):
        h = self.c_fc(x)
        return self.c_proj(h * 0.5 * (1.0 + torch.erf(h / 1.41421)))  # the original writes sqrt(2) so


class OriginalBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1, self.attn = OriginalNorm(c.n_embd), OriginalAttention(c)
        self.ln_2, self.mlp = OriginalNorm(c.n_embd), OriginalMLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OriginalModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(c.vocab_size, c.n_embd),
                drop=nn.Dropout(c.dropout),
                h=nn.ModuleList(OriginalBlock(c) for _ in range(c.n_layer)),
                ln_f=OriginalNorm(c.n_embd),
            )
        )
        self.lm_head = MuReadout(c.n_embd, c.vocab_size, bias=False)

    def forward(self, idx):
        x = self.transformer.drop(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def original_model(n_embd: int = 16, n_head: int = 2) -> OriginalModel:
    """An original-layout model saved with the original's stale config: its training script builds the base and
    delta models for muP from the same config object and leaves it at the delta's n_embd 48 / n_head 12."""
    torch.manual_seed(0)
    model = OriginalModel(OriginalConfig(n_embd=n_embd, n_head=n_head))
    set_base_shapes(model, OriginalModel(OriginalConfig(n_embd=8)))  # another base width than this recipe's 24
    model.config.n_embd, model.config.n_head = 48, 12
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5)
        model.lm_head.weight.mul_(n_embd / 16)  # undo MuReadout's 1/width so that logits stay ~1 at every width
    return model.eval()


@pytest.mark.parametrize("n_embd,n_head", [(16, 2), (64, 4), (96, 4)])
def test_converted_original_gives_the_same_logits(tmp_path, n_embd, n_head):
    """64/4 was refused and 96/4 converted silently with the config's 12 heads (1.8e-2 off) before the head count
    came from the attention modules."""
    original = original_model(n_embd, n_head)
    torch.save(original, tmp_path / "original.pt")  # the original's way: the whole pickled module
    ids = torch.randint(4, 40, (2, 24))
    ids[:, 0], ids[0, 5], ids[1, -1], ids[0, 9] = 0, 2, 3, 0  # its <unk>, <mask> and </s> (no <pad>: no mask needed)
    with torch.no_grad():
        expected = original(ids)
    assert run_cli(lambda: main([str(tmp_path / "original.pt"), str(tmp_path / "converted")])) == 0
    converted = OmniBioTA.from_pretrained(tmp_path / "converted").eval()
    assert converted.config.n_head == n_head and converted.config.n_embd == n_embd
    assert converted.config.ctx_len == 32 and converted.config.dropout == 0.1 and converted.config.pad_id == 0
    with torch.no_grad():
        logits = converted(original_to_converted_ids(ids))
    order = id_order(40)  # converted row r is original row order[r]; the order is its own inverse here
    torch.testing.assert_close(logits[..., order], expected, atol=1e-5, rtol=0)
    assert expected.abs().max() > 1.0  # logits large enough that a wrong rotary layout or scale would show


def test_loading_by_name_alone_would_be_wrong(tmp_path):
    """The permutation matters: without it the logits differ by far more than the tolerance."""
    original = original_model()
    torch.save(original, tmp_path / "original.pt")
    assert run_cli(lambda: main([str(tmp_path / "original.pt"), str(tmp_path / "converted")])) == 0
    converted = OmniBioTA.from_pretrained(tmp_path / "converted").eval()
    qkv = converted.blocks[0].attn.qkv.weight
    with torch.no_grad():
        qkv.copy_(original.transformer.h[0].attn.c_attn.weight)
        ids = torch.randint(4, 40, (1, 24))
        difference = (converted(ids)[..., id_order(40)] - original(ids)).abs().max()
    assert difference > 1e-3


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_a_pickle_that_runs_code_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": RunsCode()}, tmp_path / "evil.pt")
    assert run_cli(lambda: main([str(tmp_path / "evil.pt"), str(tmp_path / "out")]), user_errors=(OmniBioteError,)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused, the pickle tries to run code" in err[0] and "system" in err[0], err
    assert not (tmp_path / "pwned_by_pickle").exists() and not (tmp_path / "out").exists()


def test_not_a_checkpoint_is_one_line(tmp_path, capsys):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    for name, message in (("list.pt", "holds a list, not a whole pickled OmniBioTA"), ("raw.pkl", "not a readable")):
        argv = [str(tmp_path / name), str(tmp_path / "out")]
        assert run_cli(lambda argv=argv: main(argv), user_errors=(OmniBioteError,)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_an_existing_output_folder_is_refused(tmp_path, capsys):
    torch.save(original_model(), tmp_path / "original.pt")
    (tmp_path / "out").mkdir()
    assert (
        run_cli(lambda: main([str(tmp_path / "original.pt"), str(tmp_path / "out")]), user_errors=(OmniBioteError,))
        == 1
    )
    assert "already exists" in capsys.readouterr().err


def refusal(tmp_path, capsys, argv) -> str:
    assert run_cli(lambda: main(argv), user_errors=(OmniBioteError,)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not (tmp_path / "out").exists(), err
    return err[0]


def test_head_count_disagreements_are_one_line(tmp_path, capsys):
    original = original_model(96, 4)
    torch.save(original, tmp_path / "original.pt")
    argv = [str(tmp_path / "original.pt"), str(tmp_path / "out")]
    line = refusal(tmp_path, capsys, [*argv, "--n_head", "12"])
    assert "--n_head 12 contradicts the checkpoint" in line and "n_head=4" in line, line
    original.transformer.h[1].attn.n_head = 8  # a module that contradicts the others and its own rotary table
    torch.save(original, tmp_path / "original.pt")
    line = refusal(tmp_path, capsys, argv)
    assert "attention modules disagree about the head count" in line and "=8" in line and "=4" in line, line


def test_without_any_recorded_head_count_n_head_is_required(tmp_path, capsys):
    original = original_model(64, 4)
    for block in original.transformer.h:
        del block.attn.n_head, block.attn._buffers["freqs_cis"]
    torch.save(original, tmp_path / "original.pt")
    argv = [str(tmp_path / "original.pt"), str(tmp_path / "out")]
    assert "no attention module records its head count; give --n_head" in refusal(tmp_path, capsys, argv)
    assert run_cli(lambda: main([*argv, "--n_head", "4"])) == 0
    assert OmniBioTA.from_pretrained(tmp_path / "out").config.n_head == 4
