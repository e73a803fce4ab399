"""OmniBioTA: a bidirectional (BERT-style) pre-LN transformer encoder for DNA, RNA and protein tokens, with muP.

muP (maximal update parametrisation, the `mup` package) makes the best learning rate of a narrow model the best one
of a wide model too: the MLM head is a `MuReadout` (its output shrinks as 1/width), attention logits are scaled by
1/d instead of 1/sqrt(d), and `MuAdamW` divides the learning rate of hidden matrices by their width multiplier.
Widths are measured against a base model (width 24, 3 heads) and a delta model (width 48, 12 heads) as in the
original OmniBioTE. No biases, rotary position embeddings, untied embedding and head.
"""

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from mup import MuReadout, set_base_shapes
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.utils.checkpoint import checkpoint

from biorecipes_shared import atomic_write

try:  # optional fast path on CUDA; not installable on CPU machines
    from flash_attn import flash_attn_varlen_func
except Exception:  # a broken CUDA install raises other errors than ImportError
    flash_attn_varlen_func = None

POOLING_METHODS = ("mean", "first", "last", "max", "all")


@dataclasses.dataclass
class OmniBioTAConfig:
    """Architecture of an OmniBioTA model; saved as config.json next to the weights."""

    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    ctx_len: int = 1024
    dropout: float = 0.0
    pad_id: int = 0
    mlp_ratio: int = 4
    attn_mult: float = 8.0  # attention logits are q.k * attn_mult / n_embd: muP's 1/d scaling, as the original
    rope_theta: float = 10000.0
    mup: bool = True  # False gives the standard parametrisation (for the coordinate check)
    base_n_embd: int = 24
    base_n_head: int = 3
    delta_n_embd: int = 48
    delta_n_head: int = 12
    attn_impl: str = "auto"  # auto: flash-attn on CUDA when installed, else SDPA; "sdpa"; "math" (--disable_flash)

    def __post_init__(self):
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd {self.n_embd} must split into {self.n_head} heads of even size (rotary)")
        if self.attn_impl not in ("auto", "sdpa", "math"):
            raise ValueError(f"attn_impl must be auto, sdpa or math, not {self.attn_impl!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "OmniBioTAConfig":
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown OmniBioTAConfig field(s): {sorted(unknown)}")
        return cls(**values)


def rotary_tables(ctx_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (ctx_len, head_dim/2), kept in fp32 whatever the model's dtype."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(ctx_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x1, x2) of x (B, H, S, D) by position-dependent angles, computed in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def block_diagonal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) boolean mask: a token attends to tokens of its own record; padding (doc id -1) only to itself."""
    same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, None, :] >= 0)
    itself = torch.eye(doc_ids.shape[1], dtype=torch.bool, device=doc_ids.device)
    return (same_doc | itself)[:, None]


class SelfAttention(nn.Module):
    def __init__(self, config: OmniBioTAConfig):
        super().__init__()
        self.n_head = config.n_head
        self.scale = config.attn_mult / config.n_embd
        self.dropout = config.dropout
        self.impl = config.attn_impl
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, doc_ids, mask):
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        if self.impl == "auto" and flash_attn_varlen_func is not None and x.is_cuda and q.dtype != torch.float32:
            out = self._flash_varlen(q, k, v, doc_ids, dropout)
        elif self.impl == "math":
            scores = (q @ k.transpose(-2, -1)) * self.scale
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = F.dropout(scores.softmax(dim=-1), dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, width))

    def _flash_varlen(self, q, k, v, doc_ids, dropout):
        """flash-attn over the packed records: each run of equal doc ids in a row is its own sequence."""
        batch, heads, seq, dim = q.shape
        if doc_ids is None:
            doc_ids = torch.zeros(batch, seq, dtype=torch.long, device=q.device)
        flat = doc_ids + (torch.arange(batch, device=q.device)[:, None] * (seq + 1))  # no run crosses rows
        flat = flat.reshape(-1)
        starts = torch.nonzero(torch.diff(flat, prepend=flat[:1] - 1)).flatten()
        cu_seqlens = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        q, k, v = (t.transpose(1, 2).reshape(batch * seq, heads, dim) for t in (q, k, v))
        out = flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=dropout, softmax_scale=self.scale
        )
        return out.view(batch, seq, heads, dim).transpose(1, 2)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: OmniBioTAConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.ln_attn = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = SelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(config.n_embd, hidden, bias=False), nn.GELU(), nn.Linear(hidden, config.n_embd, bias=False)
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, doc_ids, mask):
        x = x + self.dropout(self.attn(self.ln_attn(x), cos, sin, doc_ids, mask))
        return x + self.dropout(self.mlp(self.ln_mlp(x)))


class OmniBioTA(nn.Module):
    """Encoder with an MLM head; `forward` gives logits or the masked-token loss, `encode` pooled embeddings."""

    def __init__(self, config: OmniBioTAConfig, _set_shapes: bool = True):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        self.lm_head = MuReadout(config.n_embd, config.vocab_size, bias=False, readout_zero_init=True)
        cos, sin = rotary_tables(config.ctx_len, config.n_embd // config.n_head, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # run-time switches, not architecture (config.json stays the same): see enable_speedups
        self.activation_checkpointing = False
        if _set_shapes:
            self._set_mup_shapes()

    def _set_mup_shapes(self) -> None:
        """Attach muP width multipliers to every parameter (all 1 under the standard parametrisation)."""
        if not self.config.mup:
            set_base_shapes(self, None)
            return
        shapes = {}
        for name, width, heads in (("base", "base_n_embd", "base_n_head"), ("delta", "delta_n_embd", "delta_n_head")):
            small = dataclasses.replace(
                self.config, n_embd=getattr(self.config, width), n_head=getattr(self.config, heads)
            )
            with torch.device("meta"):  # only parameter shapes are needed
                shapes[name] = OmniBioTA(small, _set_shapes=False)
        set_base_shapes(self, shapes["base"], delta=shapes["delta"])

    def hidden_states(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer hidden states (B, S, n_embd). doc_ids (B, S) restricts attention to each packed record;
        without it, padding tokens (pad_id) are masked out as keys."""
        if input_ids.shape[1] > self.config.ctx_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's ctx_len {self.config.ctx_len}")
        padding = input_ids == self.config.pad_id
        if doc_ids is None and bool(padding.any()):
            doc_ids = torch.where(padding, -1, 0)
        mask = block_diagonal_mask(doc_ids) if doc_ids is not None else None
        if self.rope_cos.dtype != torch.float32:  # model.to(bfloat16) cast the tables: rebuild them in fp32
            cos, sin = rotary_tables(
                self.config.ctx_len, self.config.n_embd // self.config.n_head, self.config.rope_theta
            )
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        x = self.tok_emb(input_ids)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:  # non-reentrant: works under DDP and restores the dropout RNG, so losses are identical
                x = checkpoint(block, x, self.rope_cos, self.rope_sin, doc_ids, mask, use_reentrant=False)
            else:
                x = block(x, self.rope_cos, self.rope_sin, doc_ids, mask)
        return self.ln_f(x)

    def enable_speedups(self, compile_blocks: bool = False, activation_checkpointing: bool = False) -> "OmniBioTA":
        """torch.compile each transformer block in place and/or recompute each block's activations in backward.

        In place (nn.Module.compile), so state-dict keys, parameters and their muP shapes are unchanged: compiled and
        eager models read each other's checkpoints and MuAdamW/MuReadout see the same tensors. Per block rather than
        the whole model: the loss selects the masked tokens (a data-dependent shape) and the embedding/readout are
        not worth a graph; all blocks share one compiled graph."""
        self.activation_checkpointing = activation_checkpointing
        if compile_blocks:
            for block in self.blocks:
                block.compile()
        return self

    def forward(self, input_ids, doc_ids=None, labels=None):
        """Logits (B, S, vocab) without labels; with labels (-100 = ignore), the MLM loss over labelled tokens only
        (the head runs on those tokens alone, which saves most of its cost with a 65k vocabulary)."""
        hidden = self.hidden_states(input_ids, doc_ids)
        if labels is None:
            return self.lm_head(hidden)
        selected = labels != -100
        logits = self.lm_head(hidden[selected])
        return F.cross_entropy(logits.float(), labels[selected])

    def encode(self, input_ids: torch.Tensor, method: str = "mean") -> torch.Tensor:
        """Sequence embeddings that ignore padding: mean, first (the modality token), last, max -> (B, n_embd);
        all -> (B, S, n_embd) with padding positions zeroed."""
        if method not in POOLING_METHODS:
            raise ValueError(f"method must be one of {POOLING_METHODS}, not {method!r}")
        hidden = self.hidden_states(input_ids)
        valid = (input_ids != self.config.pad_id).unsqueeze(-1)
        if method == "mean":
            return (hidden * valid).sum(1) / valid.sum(1).clamp(min=1)
        if method == "first":
            return hidden[:, 0]
        if method == "last":
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (valid.squeeze(-1) * positions).argmax(dim=1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if method == "max":
            return hidden.masked_fill(~valid, float("-inf")).amax(dim=1)
        return hidden * valid

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write config.json and model.safetensors, each under a temporary name first, then renamed.

        Raises biorecipes_shared.files.WriteError (one line: path and cause) on a full disk or missing permission;
        the temporary file is removed. For a whole folder that appears at once, see export.export_final_model.
        """
        out_dir = Path(out_dir)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        with atomic_write(out_dir / "model.safetensors", "wb") as handle:
            handle.write(safetensors_bytes(state, metadata={"format": "pt"}))
        with atomic_write(out_dir / "config.json") as handle:
            handle.write(json.dumps(self.config.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **overrides) -> "OmniBioTA":
        """Load a folder written by save_pretrained; overrides replace config fields (e.g. attn_impl="math")."""
        model_dir = Path(model_dir)
        config = OmniBioTAConfig.from_dict({**json.loads((model_dir / "config.json").read_text()), **overrides})
        model = cls(config)
        model.load_state_dict(load_file(model_dir / "model.safetensors"), strict=True)
        return model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def mup_lr(lr: float, batch_size: int) -> float:
    """The original's learning-rate rule for a global batch: lr * sqrt(batch_size) / 32 (unchanged at 1024)."""
    return lr * math.sqrt(batch_size) / 32
