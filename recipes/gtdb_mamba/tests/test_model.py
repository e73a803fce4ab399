"""The pure-PyTorch Mamba path against a sequential recurrence written here from the Mamba equations."""

import pytest
import torch
import torch.nn.functional as F

from model import BiMambaBlock, EmbedderConfig, GenomeFragmentEmbedder, make_mixer, mamba_ssm_available


def sequential_mamba(mixer, x):
    """Mamba (S6) mixer computed one position at a time: conv -> selective scan -> gate, no parallel scan."""
    d_inner = mixer.D.numel()
    d_state = mixer.A_log.shape[1]
    dt_rank = mixer.dt_proj.weight.shape[1]
    xs, z = (x @ mixer.in_proj.weight.T).split(d_inner, dim=-1)
    kernel = mixer.conv1d.weight[:, 0, :]  # (d_inner, d_conv): depthwise, causal
    d_conv = kernel.shape[1]
    length = x.shape[1]
    conv = torch.stack(
        [
            mixer.conv1d.bias
            + sum(kernel[:, k] * xs[:, t - (d_conv - 1) + k] for k in range(d_conv) if t - (d_conv - 1) + k >= 0)
            for t in range(length)
        ],
        dim=1,
    )
    u = F.silu(conv)
    dt_low, b, c = (u @ mixer.x_proj.weight.T).split([dt_rank, d_state, d_state], dim=-1)
    delta = F.softplus(dt_low @ mixer.dt_proj.weight.T + mixer.dt_proj.bias)  # (batch, length, d_inner)
    a = -torch.exp(mixer.A_log)  # (d_inner, d_state)
    h = torch.zeros(x.shape[0], d_inner, d_state, dtype=x.dtype)
    outputs = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * a) * h + delta[:, t, :, None] * b[:, t, None, :] * u[:, t, :, None]
        outputs.append((h * c[:, t, None, :]).sum(-1) + mixer.D * u[:, t])
    y = torch.stack(outputs, dim=1) * F.silu(z)
    return y @ mixer.out_proj.weight.T


@pytest.mark.parametrize("length", [13, 32])  # 13 exercises the parallel scan's padding to a power of two
def test_pure_scan_matches_sequential_reference_forward_and_grads(length):
    torch.manual_seed(0)
    mixer = make_mixer(EmbedderConfig(d_model=16, d_state=8, backend="pure"))
    x = torch.randn(3, length, 16, requires_grad=True)
    out = mixer(x)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *mixer.parameters()], grad_out)
    expected = sequential_mamba(mixer, x)
    expected_grads = torch.autograd.grad(expected, [x, *mixer.parameters()], grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    names = ["input", *(n for n, _ in mixer.named_parameters())]
    for name, grad, ref in zip(names, grads, expected_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_reverse_direction_respects_padding():
    """A right-padded sequence embeds exactly like the unpadded one (the reverse scan must not read the padding)."""
    torch.manual_seed(0)
    config = EmbedderConfig(d_model=16, n_layers=2, d_state=4, pooling="mean", backend="pure")
    model = GenomeFragmentEmbedder(config).eval()
    short = torch.randint(0, 1024, (1, 9))
    long = torch.randint(0, 1024, (1, 14))
    padded = torch.cat([short, torch.full((1, 5), config.pad_token)], dim=1)
    together = model(torch.cat([padded, long]))
    torch.testing.assert_close(together[0], model(short)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[1], model(long)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.smoke
def test_bidirectional_block_sums_forward_and_flipped_reverse():
    torch.manual_seed(0)
    block = BiMambaBlock(EmbedderConfig(d_model=8, d_state=4, backend="pure"))
    x = torch.randn(2, 10, 8)
    normed = block.norm(x)
    expected = (
        x
        + sequential_mamba(block.forward_mixer, normed)
        + sequential_mamba(block.reverse_mixer, normed.flip(1)).flip(1)
    )
    torch.testing.assert_close(block(x, None), expected, rtol=1e-4, atol=1e-5)


def test_tied_projections_share_weights():
    block = BiMambaBlock(EmbedderConfig(d_model=8, d_state=4, tie_projections=True, backend="pure"))
    assert block.reverse_mixer.in_proj.weight is block.forward_mixer.in_proj.weight
    assert block.reverse_mixer.out_proj.weight is block.forward_mixer.out_proj.weight
    assert block.reverse_mixer.x_proj.weight is not block.forward_mixer.x_proj.weight


@pytest.mark.skipif(not mamba_ssm_available(), reason="mamba_ssm and a CUDA device are needed")
def test_pure_path_matches_mamba_ssm_kernels():
    torch.manual_seed(0)
    config = EmbedderConfig(d_model=64, d_state=16)
    fused = make_mixer(config).cuda()
    pure = make_mixer(EmbedderConfig(d_model=64, d_state=16, backend="pure")).cuda()
    pure.load_state_dict(fused.state_dict())  # same parameter names by design
    x = torch.randn(2, 256, 64, device="cuda")
    torch.testing.assert_close(pure(x), fused(x), rtol=1e-3, atol=1e-3)
