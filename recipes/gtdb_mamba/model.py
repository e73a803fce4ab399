"""Bidirectional Mamba genome-fragment embedder.

Token embedding -> N blocks of (norm -> forward Mamba + reverse Mamba, summed -> residual) -> final norm ->
padding-masked sum/mean pooling. The Mamba mixer is `mamba_ssm.Mamba` (fused CUDA kernels) when it imports and
CUDA is present, otherwise `mambapy`'s pure-PyTorch `MambaBlock` (parallel scan). Both use the same parameter
names, so a checkpoint trained with one loads into the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from mambapy.mamba import MambaBlock, MambaConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

try:  # GPU-only fast path; on CPU machines the import itself fails (it loads a CUDA extension), not just the call
    from mamba_ssm import Mamba as MambaSsmMixer
except Exception:
    MambaSsmMixer = None


@dataclass
class EmbedderConfig:
    """Model hyper-parameters; saved next to exported weights as config.json."""

    vocab_size: int = 1026  # 4**5 k-mers + N token + pad token
    pad_token: int = 1025
    d_model: int = 1536
    n_layers: int = 8
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    norm: str = "layernorm"  # or "rmsnorm"
    pooling: str = "sum"  # or "mean"
    tie_projections: bool = False  # share in_proj/out_proj between the forward and reverse mixers (Caduceus-style)
    backend: str = "auto"  # "auto": mamba_ssm kernels on CUDA when importable; "pure": always mambapy


def mamba_ssm_available() -> bool:
    """True when mamba_ssm imported and a CUDA device exists."""
    return MambaSsmMixer is not None and torch.cuda.is_available()


def make_mixer(config: EmbedderConfig) -> nn.Module:
    """One unidirectional Mamba mixer, (batch, length, d_model) -> same shape."""
    if config.backend not in ("auto", "pure"):
        raise ValueError(f"model.backend must be 'auto' or 'pure', got {config.backend!r}")
    if config.backend == "auto" and mamba_ssm_available():
        return MambaSsmMixer(d_model=config.d_model, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand)
    return MambaBlock(
        MambaConfig(
            d_model=config.d_model,
            n_layers=1,
            d_state=config.d_state,
            d_conv=config.d_conv,
            expand_factor=config.expand,
        )
    )


def make_norm(config: EmbedderConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.d_model)
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=1e-5)
    raise ValueError(f"model.norm must be 'layernorm' or 'rmsnorm', got {config.norm!r}")


def reverse_valid_positions(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """Index that reverses each sequence within its own length and leaves padding in place (an involution)."""
    positions = torch.arange(max_length, device=lengths.device).expand(len(lengths), max_length)
    return torch.where(positions < lengths[:, None], lengths[:, None] - 1 - positions, positions)


class BiMambaBlock(nn.Module):
    """Pre-norm residual block whose mixer reads the sequence both ways and adds the two outputs."""

    def __init__(self, config: EmbedderConfig):
        super().__init__()
        self.norm = make_norm(config)
        self.forward_mixer = make_mixer(config)
        self.reverse_mixer = make_mixer(config)
        if config.tie_projections:
            self.reverse_mixer.in_proj = self.forward_mixer.in_proj
            self.reverse_mixer.out_proj = self.forward_mixer.out_proj

    def forward(self, hidden: torch.Tensor, reverse_index: torch.Tensor | None) -> torch.Tensor:
        normed = self.norm(hidden)
        forward_out = self.forward_mixer(normed)
        if reverse_index is None:  # no padding: a plain flip
            reverse_out = self.reverse_mixer(normed.flip(1)).flip(1)
        else:
            gather_index = reverse_index[..., None].expand_as(normed)
            reverse_out = self.reverse_mixer(normed.gather(1, gather_index)).gather(1, gather_index)
        return hidden + forward_out + reverse_out


class GenomeFragmentEmbedder(nn.Module):
    """Token ids (batch, length) -> one embedding (batch, d_model) per fragment."""

    def __init__(self, config: EmbedderConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token)
        self.blocks = nn.ModuleList(BiMambaBlock(config) for _ in range(config.n_layers))
        self.final_norm = make_norm(config)
        # A training switch, not part of the exported config: recompute each block in the backward pass.
        self.activation_checkpointing = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        is_token = tokens != self.config.pad_token
        lengths = is_token.sum(1)
        # Causal mixers only see earlier positions, so right padding cannot leak into the forward direction; the
        # reverse direction is flipped per sequence so that its padding also comes last.
        reverse_index = (
            None if bool((lengths == tokens.shape[1]).all()) else reverse_valid_positions(lengths, tokens.shape[1])
        )
        hidden = self.embedding(tokens)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(block, hidden, reverse_index, use_reentrant=False)
            else:
                hidden = block(hidden, reverse_index)
        hidden = self.final_norm(hidden) * is_token[..., None]
        pooled = hidden.sum(1)
        if self.config.pooling == "mean":
            pooled = pooled / lengths.clamp(min=1)[:, None]
        elif self.config.pooling != "sum":
            raise ValueError(f"model.pooling must be 'sum' or 'mean', got {self.config.pooling!r}")
        return pooled

    def to_dict(self) -> dict:
        return asdict(self.config)


def set_speed_switches(embedder: GenomeFragmentEmbedder, compile_blocks: bool, activation_checkpointing: bool) -> None:
    """`train.compile`: torch.compile each bidirectional block in place (`nn.Module.compile`), so state-dict keys and
    checkpoints stay those of the eager model; per block because the embedder's padding check is data-dependent.
    `train.activation_checkpointing`: keep only each block's input and recompute the block in the backward pass."""
    embedder.activation_checkpointing = activation_checkpointing
    if compile_blocks:
        for block in embedder.blocks:
            block.compile()


class CurricularFace(nn.Module):
    """CurricularFace classification head (Huang et al., 2020) over genome classes; returns scaled logits.

    cos(theta_y + m) for the true class (cos theta_y - m sin m past the pi - m threshold); a hard negative j with
    cos theta_j > cos(theta_y + m) becomes cos theta_j * (t + cos theta_j), where t tracks mean cos theta_y with
    momentum `t_momentum`. No maintained library ships this head, hence written here.
    """

    def __init__(
        self, embedding_dim: int, n_classes: int, scale: float = 30.0, margin: float = 0.0, t_momentum: float = 0.01
    ):
        super().__init__()
        self.scale, self.margin, self.t_momentum = scale, margin, t_momentum
        self.weight = nn.Parameter(torch.randn(n_classes, embedding_dim) * 0.01)
        self.register_buffer("t", torch.zeros(()))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).T
        cos = cos.clamp(-1.0, 1.0)
        cos_target = cos.gather(1, labels[:, None])
        sin_target = (1.0 - cos_target.square()).clamp(min=0.0).sqrt()
        cos_target_margin = cos_target * torch.cos(torch.tensor(self.margin)) - sin_target * torch.sin(
            torch.tensor(self.margin)
        )
        threshold = torch.cos(torch.tensor(torch.pi - self.margin))
        final_target = torch.where(
            cos_target > threshold, cos_target_margin, cos_target - self.margin * torch.sin(torch.tensor(self.margin))
        )
        if self.training:
            with torch.no_grad():
                self.t.mul_(1.0 - self.t_momentum).add_(self.t_momentum * cos_target.mean())
        hard = cos > cos_target_margin
        logits = torch.where(hard, cos * (self.t + cos), cos)
        logits = logits.scatter(1, labels[:, None], final_target)
        return logits * self.scale


class EmbedderWithHead(nn.Module):
    """The trained unit: embedder + CurricularFace head, so DDP and checkpoints see one module."""

    def __init__(self, embedder: GenomeFragmentEmbedder, head: CurricularFace):
        super().__init__()
        self.embedder, self.head = embedder, head

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens (batch, length) ids, labels (batch,) genome classes -> CurricularFace logits (batch, classes)."""
        return self.head(self.embedder(tokens), labels)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when `bf16` (train.bf16); a no-op context on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
