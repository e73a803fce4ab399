"""Attention over packed rows (data.batching=packed): several cells per row, each attending only to itself.

Three ways to the same result (`segment_kernel` picks one):
- `varlen`: CUDA, flash-attn installed, fp16/bf16 input: `flash_attn_varlen_func` computes each cell (and each row's
  padding run) as its own sequence, so nothing is spent across cells;
- `mask`: CUDA without flash-attn: scaled_dot_product_attention with a block-diagonal boolean mask (seq² per row,
  but one fused kernel launch);
- `runs`: CPU: scaled_dot_product_attention on each run separately (sum of len² per row instead of seq²; a Python
  loop over a few cells per row costs nothing next to the CPU compute). flex_attention has no CPU backward in
  torch 2.13, hence neither it nor a block mask there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_varlen_func
except Exception:  # not installed, or a build that fails to load its CUDA library (not always an ImportError)
    flash_attn_varlen_func = None


class Segments:
    """The cells of packed rows. `segment_ids`: int [rows, seq], 1, 2, ... per cell of a row, 0 on padding."""

    def __init__(self, segment_ids: torch.Tensor):
        self.segment_ids = segment_ids
        self._mask: torch.Tensor | None = None
        self._varlen: tuple[torch.Tensor, int] | None = None

    def mask(self) -> torch.Tensor:
        """bool [rows, 1, seq, seq], True where query and key are in the same cell. Padding attends to padding, so
        no query row is empty (an all-False row makes SDPA return NaN), and no cell sees padding or another cell."""
        if self._mask is None:
            self._mask = (self.segment_ids[:, :, None] == self.segment_ids[:, None, :])[:, None]
        return self._mask

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens int32 [runs + 1], longest run) over the flattened rows: a run is a cell or a row's padding."""
        if self._varlen is None:
            flat = self.segment_ids.flatten()
            starts = torch.ones_like(flat, dtype=torch.bool)
            starts[1:] = flat[1:] != flat[:-1]
            starts[:: self.segment_ids.shape[1]] = True  # a new row starts a run even with the same id
            bounds = torch.cat([starts.nonzero().flatten(), torch.tensor([flat.numel()], device=flat.device)])
            self._varlen = (bounds.to(torch.int32), int(bounds.diff().max()))
        return self._varlen


def attention_spec(attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None):
    """What the layers attend with: Segments when a row holds several cells; else a key-padding mask bool
    [batch, 1, 1, seq] (padded queries see real keys, which is harmless: their outputs are never used); else None."""
    if segment_ids is not None and bool((segment_ids > 1).any()):
        return Segments(segment_ids)
    if attention_mask is not None and not bool(attention_mask.all()):
        return attention_mask.bool()[:, None, None, :]
    return None


def segment_kernel(query: torch.Tensor) -> str:
    """varlen (flash-attn: CUDA, fp16/bf16 only), mask (other CUDA) or runs (CPU); see the module docstring."""
    if not query.is_cuda:
        return "runs"
    if flash_attn_varlen_func is not None and query.dtype in (torch.float16, torch.bfloat16):
        return "varlen"
    return "mask"


def attention(query, key, value, keep, dropout_p: float) -> torch.Tensor:
    """query/key/value [batch, heads, seq, head_dim] -> context of the same shape; `keep` from attention_spec."""
    if isinstance(keep, Segments):
        kernel = segment_kernel(query)
        if kernel != "mask":
            return _by_runs(query, key, value, keep, dropout_p, kernel == "varlen")
        keep = keep.mask()
    return F.scaled_dot_product_attention(query, key, value, attn_mask=keep, dropout_p=dropout_p)


def _by_runs(query, key, value, segments: Segments, dropout_p: float, varlen: bool) -> torch.Tensor:
    """Each run (a cell, or a row's padding) attends only to itself: flash-attn varlen, or SDPA run by run."""
    batch, heads, seq, head_dim = query.shape
    cu_seqlens, longest = segments.varlen()

    def tokens(tensor: torch.Tensor) -> torch.Tensor:  # [batch, heads, seq, d] -> [batch * seq, heads, d]
        return tensor.transpose(1, 2).reshape(batch * seq, heads, head_dim)

    q, k, v = tokens(query), tokens(key), tokens(value)
    if varlen:
        context = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, longest, longest, dropout_p=dropout_p)
    else:
        bounds = cu_seqlens.tolist()
        context = torch.cat(
            [
                F.scaled_dot_product_attention(
                    *(t[start:end].transpose(0, 1) for t in (q, k, v)), dropout_p=dropout_p
                ).transpose(0, 1)
                for start, end in zip(bounds[:-1], bounds[1:])
            ]
        )
    return context.view(batch, seq, heads, head_dim).transpose(1, 2)
