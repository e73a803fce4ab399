"""Geneformer: a BERT masked-LM over rank-value encoded cells.

Two interchangeable encoder-layer implementations behind one `BertForMaskedLM`:
- plain PyTorch (scaled_dot_product_attention), always available, with Hugging Face BERT parameter names, so an
  exported checkpoint loads in `transformers.BertForMaskedLM` unchanged;
- Transformer Engine `te.TransformerLayer` (`use_te_layers=True`, needs a CUDA build of TE), which enables FP8.
Checkpoints are always exported in the Hugging Face layout; `hf_to_te_state_dict` / `te_to_hf_state_dict` convert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MaskedLMOutput

from packed_attention import Segments, attention, attention_spec

try:
    import transformer_engine.pytorch as te
except Exception:  # TE raises RuntimeError, not ImportError, when its CUDA libraries are missing
    te = None

IGNORE_INDEX = -100  # label of tokens that are not predicted (torch.nn.CrossEntropyLoss default)

# Hugging Face activation name -> Transformer Engine activation name. TE's "gelu" is the tanh approximation, so the
# exact (erf) "gelu" of Hugging Face has no TE equivalent and is refused rather than silently swapped.
TE_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


def geneformer_config(vocab_size: int, use_te_layers: bool = False, **bert_kwargs) -> BertConfig:
    """A `BertConfig` for Geneformer; `use_te_layers` is stored in config.json (plain BERT loaders ignore it)."""
    bert_kwargs.setdefault("pad_token_id", 0)
    return BertConfig(vocab_size=vocab_size, use_te_layers=use_te_layers, **bert_kwargs)


def check_te_config(config: BertConfig) -> None:
    """Raise a one-line ValueError when the TE path cannot honour this config."""
    if te is None:
        raise ValueError("model.use_te_layers=true needs transformer_engine (a CUDA build); it does not import here")
    if config.hidden_act not in TE_ACTIVATIONS:
        raise ValueError(
            f"hidden_act={config.hidden_act!r} has no Transformer Engine equivalent (use one of {sorted(TE_ACTIVATIONS)})"
        )


class BertEmbeddings(nn.Module):
    """Gene token + position (+ the constant token-type 0 row, kept for BERT compatibility) -> LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`position_ids` [batch, seq] for packed rows (restarting per cell); None: 0..seq-1 in every row."""
        if position_ids is None:
            positions = self.position_embeddings.weight[: input_ids.shape[1]]
        else:
            positions = self.position_embeddings(position_ids)
        embedded = self.word_embeddings(input_ids) + positions + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(embedded))


def _dense_layernorm(config: BertConfig, in_features: int) -> nn.ModuleDict:
    return nn.ModuleDict(
        {
            "dense": nn.Linear(in_features, config.hidden_size),
            "LayerNorm": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        }
    )


class BertLayer(nn.Module):
    """Post-LayerNorm BERT encoder layer; module names follow transformers' BertLayer so state dicts match."""

    def __init__(self, config: BertConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.attention_dropout = config.attention_probs_dropout_prob
        self.attention = nn.ModuleDict(
            {
                "self": nn.ModuleDict({name: nn.Linear(hidden, hidden) for name in ("query", "key", "value")}),
                "output": _dense_layernorm(config, hidden),
            }
        )
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(hidden, config.intermediate_size)})
        self.output = _dense_layernorm(config, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, keep) -> torch.Tensor:
        """`keep` (packed_attention.attention_spec): None (no padding), bool [batch, 1, 1, seq] True for real tokens,
        or Segments (packed rows: attention within each cell only)."""
        batch, seq, width = hidden.shape
        qkv_layers = self.attention["self"]
        # One GEMM for q, k and v (the weights stay separate so the names match Hugging Face BERT).
        weight = torch.cat([qkv_layers[n].weight for n in ("query", "key", "value")])
        bias = torch.cat([qkv_layers[n].bias for n in ("query", "key", "value")])
        qkv = F.linear(hidden, weight, bias).view(batch, seq, 3, self.num_heads, width // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        context = attention(query, key, value, keep, self.attention_dropout if self.training else 0.0)
        context = context.transpose(1, 2).reshape(batch, seq, width)
        attn_out = self.attention["output"]
        hidden = attn_out["LayerNorm"](hidden + self.dropout(attn_out["dense"](context)))
        ffn = self.output["dense"](self.activation(self.intermediate["dense"](hidden)))
        return self.output["LayerNorm"](hidden + self.dropout(ffn))


class TELayer(nn.Module):
    """The same post-LayerNorm layer built from `te.TransformerLayer` (fused kernels, FP8 capable)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        init = _normal_init(config.initializer_range)
        self.layer = te.TransformerLayer(
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads,
            layernorm_epsilon=config.layer_norm_eps,
            hidden_dropout=config.hidden_dropout_prob,
            attention_dropout=config.attention_probs_dropout_prob,
            init_method=init,
            output_layer_init_method=init,
            layer_type="encoder",
            self_attn_mask_type="padding",
            # BERT is post-LN: LN(x + attn(x)), then LN(h + mlp(h)) with the residual taken after the first LN.
            output_layernorm=True,
            apply_residual_connection_post_layernorm=True,
            activation=TE_ACTIVATIONS[config.hidden_act],
            fuse_qkv_params=True,
            qkv_weight_interleaved=False,  # q, k, v stacked along dim 0: a plain concatenation of the HF weights
            attn_input_format="bshd",
        )

    def forward(self, hidden: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        if keep is None:
            keep = torch.ones(hidden.shape[0], 1, 1, hidden.shape[1], dtype=torch.bool, device=hidden.device)
        return self.layer(hidden, attention_mask=~keep)  # TE masks out the positions that are True


def _normal_init(std: float):
    def init(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=std)

    return init


class MaskedLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> decoder tied to the gene embeddings (+ its own bias), as in BERT."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = nn.ModuleDict(
            {
                "dense": nn.Linear(config.hidden_size, config.hidden_size),
                "LayerNorm": nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
            }
        )
        self.activation = ACT2FN[config.hidden_act]
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias  # one tensor under both names, like transformers' BertLMPredictionHead

    def _tie_weights(self) -> None:
        # called by PreTrainedModel.tie_weights: loading on the meta device re-creates parameters one by one
        self.decoder.bias = self.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.transform["LayerNorm"](self.activation(self.transform["dense"](hidden)))
        return self.decoder(hidden)


class BertEncoderModel(nn.Module):
    """Embeddings + encoder layers (the `bert.` prefix of the state dict)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        layer_cls = TELayer if getattr(config, "use_te_layers", False) else BertLayer
        self.encoder = nn.ModuleDict(
            {"layer": nn.ModuleList(layer_cls(config) for _ in range(config.num_hidden_layers))}
        )
        self.activation_checkpointing = False  # set by configure_layers; a plain attribute, not in the state dict

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`position_ids`, `segment_ids` [batch, seq]: packed rows (MaskingCollator.pack); None for one cell a row."""
        keep = attention_spec(attention_mask, segment_ids)
        if segment_ids is not None and not isinstance(keep, Segments):
            # packed rows of one cell each (a corpus at the length cap): positions 0..len-1 as unpacked, which the
            # slice path gives without an index lookup; padding positions never reach a real token
            position_ids = None
        hidden = self.embeddings(input_ids, position_ids)
        for layer in self.encoder["layer"]:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # keep only each layer's input; its activations are recomputed in the backward (non-reentrant: works
                # under DDP and FSDP2, and replays the same dropout masks)
                hidden = checkpoint(layer, hidden, keep, use_reentrant=False)
            else:
                hidden = layer(hidden, keep)
        return hidden


def configure_layers(model: nn.Module, compile: bool = False, activation_checkpointing: bool = False) -> None:
    """training.compile / training.activation_checkpointing on a BertForMaskedLM, in place and per encoder layer.

    `nn.Module.compile()` keeps every parameter name (no `_orig_mod.` prefix), so compiled and eager runs read each
    other's checkpoints. Layers, not the whole model: the masked-token head indexes by a data-dependent mask, which
    would break the graph (and recompile) on every batch; the layers see one shape per padded length."""
    model.bert.activation_checkpointing = activation_checkpointing
    if compile:
        for layer in model.bert.encoder["layer"]:
            layer.compile()


class BertForMaskedLM(PreTrainedModel):
    """Geneformer masked-LM; `save_pretrained` writes a checkpoint that transformers' BertForMaskedLM also loads."""

    config_class = BertConfig
    base_model_prefix = "bert"
    # {tied parameter: its source} (transformers 5 form): the decoder shares the gene embeddings and the head bias
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: BertConfig):
        if getattr(config, "use_te_layers", False):
            check_te_config(config)
        super().__init__(config)
        self.bert = BertEncoderModel(config)
        self.cls = nn.ModuleDict({"predictions": MaskedLMHead(config)})
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls["predictions"].decoder

    def _init_weights(self, module: nn.Module) -> None:
        """BERT initialisation: normal(0, initializer_range) weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MaskedLMHead):
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        masked_logits_only: bool = False,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        **unused,
    ) -> MaskedLMOutput:
        """Logits for every position; with `masked_logits_only` and labels, only for the labelled positions
        (shape [n_labelled, vocab], row-major order): the same loss at a fraction of the decoder cost.
        `position_ids` / `segment_ids` [batch, seq] describe packed rows (several cells a row, see data.py)."""
        if unused.get("token_type_ids") is not None and bool(unused["token_type_ids"].any()):
            raise ValueError("Geneformer has a single token type; token_type_ids must be all zero")
        hidden = self.bert(input_ids, attention_mask, position_ids, segment_ids)
        if labels is not None and masked_logits_only:
            selected = labels != IGNORE_INDEX
            logits = self.cls["predictions"](hidden[selected])
            loss = F.cross_entropy(logits.float(), labels[selected])
            return MaskedLMOutput(loss=loss, logits=logits)
        logits = self.cls["predictions"](hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return MaskedLMOutput(loss=loss, logits=logits)

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """Always writes the Hugging Face layout, also for the TE path, so any loader reads it."""
        if getattr(self.config, "use_te_layers", False):
            state_dict = te_to_hf_state_dict(state_dict if state_dict is not None else self.state_dict())
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, use_te_layers: bool | None = None, **kwargs):
        """Load an exported (Hugging Face layout) checkpoint; `use_te_layers` overrides the saved choice."""
        saved = BertConfig.from_pretrained(pretrained_model_name_or_path)
        if use_te_layers is None:
            use_te_layers = bool(getattr(saved, "use_te_layers", False))
        plain = super().from_pretrained(pretrained_model_name_or_path, *args, use_te_layers=False, **kwargs)
        if not use_te_layers:
            return plain
        plain.config.use_te_layers = True
        model = cls(plain.config)
        missing, unexpected = model.load_state_dict(hf_to_te_state_dict(plain.state_dict()), strict=False)
        missing = [key for key in missing if not key.endswith("_extra_state")]  # FP8 metadata, created by TE
        if missing or unexpected:
            raise ValueError(
                f"{pretrained_model_name_or_path}: weights do not fit the TE layout ({missing + unexpected})"
            )
        return model.to("cuda")  # TE layers only run on CUDA (check_te_config already required a CUDA build)


# ---- weight mapping between the plain (Hugging Face) layout and the TE layout, per encoder layer ----
_HF_TO_TE = {
    "attention.output.dense.weight": "layer.self_attention.proj.weight",
    "attention.output.dense.bias": "layer.self_attention.proj.bias",
    "attention.output.LayerNorm.weight": "layer.layernorm_mlp.layer_norm_weight",
    "attention.output.LayerNorm.bias": "layer.layernorm_mlp.layer_norm_bias",
    "intermediate.dense.weight": "layer.layernorm_mlp.fc1_weight",
    "intermediate.dense.bias": "layer.layernorm_mlp.fc1_bias",
    "output.dense.weight": "layer.layernorm_mlp.fc2_weight",
    "output.dense.bias": "layer.layernorm_mlp.fc2_bias",
    "output.LayerNorm.weight": "layer.layernorm.weight",
    "output.LayerNorm.bias": "layer.layernorm.bias",
}
_QKV = ("query", "key", "value")
_LAYER_PREFIX = "bert.encoder.layer."


def _convert_layers(state_dict: dict[str, torch.Tensor], convert_entry) -> dict[str, torch.Tensor]:
    """Apply convert_entry(layer_prefix, name_in_layer, tensor) -> {new key: tensor} to encoder-layer entries only."""
    converted = {}
    for key, tensor in state_dict.items():
        if not key.startswith(_LAYER_PREFIX):
            converted[key] = tensor
            continue
        index, _, rest = key[len(_LAYER_PREFIX) :].partition(".")
        converted.update(convert_entry(f"{_LAYER_PREFIX}{index}.", rest, tensor))
    return converted


def hf_to_te_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain/HF layout -> TE layout: q, k, v are stacked into one fused qkv; other layer tensors are renamed."""

    def convert(prefix: str, rest: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if not rest.startswith("attention.self."):
            return {prefix + _HF_TO_TE[rest]: tensor}
        kind = rest.rsplit(".", 1)[1]  # weight or bias
        if rest != f"attention.self.query.{kind}":
            return {}  # key and value are stacked when their query is met
        parts = [state_dict[f"{prefix}attention.self.{name}.{kind}"] for name in _QKV]
        return {f"{prefix}layer.self_attention.qkv.{kind}": torch.cat(parts)}

    return _convert_layers(state_dict, convert)


def te_to_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TE layout -> plain/HF layout (inverse of hf_to_te_state_dict); TE's FP8 `_extra_state` entries are dropped."""
    te_to_hf = {te_name: hf_name for hf_name, te_name in _HF_TO_TE.items()}

    def convert(prefix: str, rest: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if rest.endswith("_extra_state"):
            return {}
        if not rest.startswith("layer.self_attention.qkv."):
            return {prefix + te_to_hf[rest]: tensor}
        kind = rest.rsplit(".", 1)[1]
        return {f"{prefix}attention.self.{name}.{kind}": part.clone() for name, part in zip(_QKV, tensor.chunk(3))}

    return _convert_layers(state_dict, convert)
