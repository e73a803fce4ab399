"""Plant DNA language model: causal sliding-window attention for short range, attention over a 6-mer bucket
memory for long range, and a species embedding.

Bucket memory (one row per 6-mer, 4096 x d_model) — the exact rule:
    During forward passes the detached last-layer hidden state h_p of every *written* position p (the first
    `write_len` positions of a window, i.e. the part no later window of the same stream overlaps) is staged:
        staged_sum[t] += h_p,  staged_count[t] += 1     for t = token id at p.
    After the optimizer step, `commit()` sums the staged values over ranks and folds them in with an exponential
    forgetting horizon of `global_context` written tokens (n = tokens written in this step):
        decay = exp(-n / global_context)
        sums   = decay * sums   + staged_sum
        counts = decay * counts + staged_count
    A bucket whose count decays below 1e-4 is emptied. Global attention reads the bucket means sums[t] / counts[t]
    of non-empty buckets, plus one learned "null" slot so a query always has something to attend to. Every
    `normalize_every` commits each mean is rescaled to unit RMS (sums /= rms(sums / counts)), so the memory keeps
    one scale while the hidden states drift during training.
    Cost per step is O(n_tokens * d + 4096 * d): it does not grow with `global_context`.

Why it is causal: the memory only changes in `commit()`, after the optimizer step, outside autograd. A forward
pass therefore reads only values written by earlier steps; a window never sees memory written from its own
positions. The data pipeline advances each species' stream in genomic order (in lockstep on all ranks) and only
positions that no later window covers are written, so memory never holds a later position of a window it serves.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

VOCAB_SIZE = 4096  # 4**6 six-mers; also the number of memory buckets


def blocked_local_attention(q, k, v, window: int, dropout_p: float = 0.0):
    """Causal sliding-window attention, position i attends to (i - window, i], in blocks of `window` queries.

    q, k, v: (batch, heads, seq, head_dim). Each query block sees its own and the previous key block, so memory
    is O(seq * window). Written by hand: flex_attention has no CPU backward and a dense band mask is O(seq^2).
    """
    batch, heads, seq, dim = q.shape
    n_blocks = math.ceil(seq / window)
    pad = n_blocks * window - seq
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    q_blocks = q.view(batch, heads, n_blocks, window, dim)
    # Keys/values for block b: positions [(b-1)*window, (b+1)*window), with one zero block in front of block 0.
    k_blocks = F.pad(k, (0, 0, window, 0)).unfold(2, 2 * window, window).transpose(-1, -2)
    v_blocks = F.pad(v, (0, 0, window, 0)).unfold(2, 2 * window, window).transpose(-1, -2)
    query_pos = torch.arange(n_blocks * window, device=q.device).view(n_blocks, window, 1)
    key_pos = (torch.arange(n_blocks, device=q.device).view(n_blocks, 1, 1) - 1) * window + torch.arange(
        2 * window, device=q.device
    ).view(1, 1, 2 * window)
    allowed = (key_pos <= query_pos) & (key_pos > query_pos - window) & (key_pos >= 0)
    # Reshaping to (batch*heads, blocks, ...) copies the strided unfold views into contiguous keys/values: fed the
    # views directly, the backward matmuls ran about 10x slower on CPU.
    out = F.scaled_dot_product_attention(
        q_blocks.reshape(batch * heads, n_blocks, window, dim),
        k_blocks.reshape(batch * heads, n_blocks, 2 * window, dim),
        v_blocks.reshape(batch * heads, n_blocks, 2 * window, dim),
        attn_mask=allowed,
        dropout_p=dropout_p,
    )
    return out.reshape(batch, heads, n_blocks * window, dim)[:, :, :seq]


def dense_local_attention(q, k, v, window: int, dropout_p: float = 0.0):
    """Reference: the same attention through SDPA with a dense (seq x seq) banded causal mask."""
    pos = torch.arange(q.shape[-2], device=q.device)
    offset = pos.view(-1, 1) - pos.view(1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(offset >= 0) & (offset < window), dropout_p=dropout_p)


class BucketMemory(nn.Module):
    """Per-6-mer running means of hidden states; see the module docstring for the update rule."""

    def __init__(self, d_model: int, n_buckets: int = VOCAB_SIZE):
        super().__init__()
        self.register_buffer("sums", torch.zeros(n_buckets, d_model))
        self.register_buffer("counts", torch.zeros(n_buckets))
        self.register_buffer("commits", torch.zeros((), dtype=torch.long))
        # Staged writes of the current optimizer step; not part of the checkpoint (always empty at a step boundary).
        self.register_buffer("staged_sums", torch.zeros(n_buckets, d_model), persistent=False)
        self.register_buffer("staged_counts", torch.zeros(n_buckets), persistent=False)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(bucket means, non-empty mask)."""
        nonempty = self.counts > 0
        return self.sums / self.counts.clamp_min(1e-12).unsqueeze(-1), nonempty

    @torch.no_grad()
    def stage(self, token_ids: torch.Tensor, hidden: torch.Tensor, write_len: int) -> None:
        """Queue the hidden states of the first `write_len` positions of each window for the next commit."""
        ids = token_ids[:, :write_len].reshape(-1)
        self.staged_sums.index_add_(0, ids, hidden[:, :write_len].reshape(len(ids), -1).float())
        self.staged_counts.index_add_(0, ids, torch.ones_like(ids, dtype=self.staged_counts.dtype))

    @torch.no_grad()
    def commit(self, global_context: int, normalize_every: int) -> None:
        """Fold the staged writes (summed over ranks) into the memory; call after the optimizer step."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.staged_sums)
            dist.all_reduce(self.staged_counts)
        decay = math.exp(-float(self.staged_counts.sum()) / global_context)
        self.sums.mul_(decay).add_(self.staged_sums)
        self.counts.mul_(decay).add_(self.staged_counts)
        # A bucket whose weight decayed below 1e-4 is emptied: it is forgotten anyway, and float32 denormals would
        # slow every later commit on CPU.
        forgotten = self.counts < 1e-4
        self.sums.masked_fill_(forgotten.unsqueeze(-1), 0.0)
        self.counts.masked_fill_(forgotten, 0.0)
        self.staged_sums.zero_()
        self.staged_counts.zero_()
        self.commits += 1
        if normalize_every > 0 and int(self.commits) % normalize_every == 0:
            self.normalize()

    @torch.no_grad()
    def normalize(self) -> None:
        """Rescale every non-empty bucket so that its mean has unit RMS."""
        means, nonempty = self.read()
        rms = means.pow(2).mean(-1).sqrt()
        scale = torch.where(nonempty & (rms > 0), 1.0 / rms.clamp_min(1e-12), torch.ones_like(rms))
        self.sums.mul_(scale.unsqueeze(-1))


class GlobalBucketAttention(nn.Module):
    """Queries from the sequence; keys/values projected from all non-empty buckets plus a learned null slot."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.memory_norm = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.null_key_value = nn.Parameter(torch.zeros(1, 2 * d_model))
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        head_dim = d_model // self.n_heads
        slots = torch.cat([self.null_key_value, self.key_value(self.memory_norm(memory.to(x.dtype)))])
        key, value = slots.view(1, -1, 2, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
        # Keys/values are the same for every sequence, so the batch folds into one long query axis (3-7x faster on
        # CPU than broadcasting them). No dropout on the 4097-slot probabilities: it cost more than the attention.
        query = self.query(x).view(1, batch * seq, self.n_heads, head_dim).transpose(1, 2)
        visible = torch.cat([nonempty.new_ones(1), nonempty]).view(1, 1, 1, -1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=visible)
        return self.out(out.transpose(1, 2).reshape(batch, seq, d_model))


class LocalAttention(nn.Module):
    """Multi-head causal sliding-window self-attention."""

    def __init__(self, d_model: int, n_heads: int, window: int, dropout: float):
        super().__init__()
        self.n_heads, self.window, self.dropout = n_heads, window, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, d_model // self.n_heads).permute(2, 0, 3, 1, 4)
        out = blocked_local_attention(q, k, v, self.window, self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(batch, seq, d_model))


class PlantBlock(nn.Module):
    """Pre-LayerNorm block: local attention, global bucket attention, GELU MLP, each residual."""

    def __init__(self, d_model: int, n_heads: int, window: int, dropout: float):
        super().__init__()
        self.norm_local, self.norm_global, self.norm_mlp = (nn.LayerNorm(d_model) for _ in range(3))
        self.local_attn = LocalAttention(d_model, n_heads, window, dropout)
        self.global_attn = GlobalBucketAttention(d_model, n_heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory, nonempty):
        x = x + self.drop(self.local_attn(self.norm_local(x)))
        x = x + self.drop(self.global_attn(self.norm_global(x), memory, nonempty))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


class PlantLM(nn.Module):
    """Next-6-mer language model over plant genomes; `memory` holds the bucket state (saved in the state dict)."""

    def __init__(
        self,
        n_species: int,
        d_model: int = 512,
        n_heads: int = 8,
        n_layers: int = 6,
        dropout: float = 0.1,
        local_attn_window: int = 32,
        max_positions: int = 64,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.max_positions = max_positions
        self.token_embedding = nn.Embedding(VOCAB_SIZE, d_model)
        self.species_embedding = nn.Embedding(n_species, d_model)
        self.position_embedding = nn.Embedding(max_positions, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PlantBlock(d_model, n_heads, local_attn_window, dropout) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, VOCAB_SIZE, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied input/output 6-mer embeddings
        self.memory = BucketMemory(d_model)
        # Execution switches, not architecture: neither changes a weight, a state-dict key or a result.
        self.activation_checkpointing = False
        self.apply(self._init_weights)

    def compile_blocks(self, **options) -> None:
        """torch.compile each transformer block in place (`nn.Module.compile`): the state-dict keys stay those of
        the eager model, so compiled and eager runs read each other's checkpoints. The bucket memory's staging and
        commit (in-place buffer updates) stay eager, outside the compiled graphs."""
        for block in self.blocks:
            block.compile(**options)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, input_ids: torch.Tensor, species_ids: torch.Tensor) -> torch.Tensor:
        """Last-block hidden states (batch, seq, d_model), before the final norm; reads but never writes the memory.

        Causal: position p depends only on tokens <= p (local attention is causal, the memory is fixed during a
        forward pass), so right padding never changes the states of the real tokens before it.
        """
        seq = input_ids.shape[1]
        if seq > self.max_positions:
            raise ValueError(f"sequence of {seq} tokens is longer than max_positions {self.max_positions}")
        positions = torch.arange(seq, device=input_ids.device)
        x = (
            self.token_embedding(input_ids)
            + self.position_embedding(positions)
            + self.species_embedding(species_ids).unsqueeze(1)
        )
        x = self.drop(x)
        memory, nonempty = self.memory.read()
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Keeps only each block's input; backward recomputes the block (same dropout masks: the RNG state
                # is saved). A block never touches the memory, so a recompute cannot stage or commit twice.
                x = checkpoint(block, x, memory, nonempty, use_reentrant=False)
            else:
                x = block(x, memory, nonempty)
        return x

    def pooled_embedding(self, input_ids: torch.Tensor, species_ids: torch.Tensor, lengths: torch.Tensor):
        """(batch, d_model) mean of the final-norm hidden states over the first `lengths[i]` tokens of each row;
        positions past a row's length (padding) are never pooled."""
        hidden = self.final_norm(self.hidden_states(input_ids, species_ids)).float()
        valid = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < lengths[:, None]
        return (hidden * valid[..., None]).sum(1) / lengths.clamp(min=1)[:, None].to(hidden.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        species_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        memory_write_len: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Logits (batch, seq, 4096), loss when `targets` is given; stages `memory_write_len` positions per window."""
        x = self.hidden_states(input_ids, species_ids)
        if memory_write_len > 0:
            self.memory.stage(input_ids, x.detach(), memory_write_len)
        logits = self.lm_head(self.final_norm(x))
        result = {"logits": logits}
        if targets is not None:
            result["loss"] = F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), targets.reshape(-1))
        return result
