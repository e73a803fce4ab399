"""ESM-2 masked-LM model: architecture table, the 33-token ESM vocabulary and the attention back-ends.

There is no model hub at run time, so the recipe carries what `facebook/esm2_*` configs would have given:
the layer/width/head table and the vocabulary. `build_model` returns transformers' own `EsmForMaskedLM` with the
chosen attention (`sdpa`, `flash_attention_2`, `flex_attention`, `eager`), so published ESM-2 folders load as they
are and exports load in transformers; `faesm` (its own environment, transformers <= 4.53) builds faesm's
`FAEsmForMaskedLM`, which has the same state-dict keys, so a checkpoint written by any back-end loads in every other.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, EsmConfig, EsmTokenizer

log = logging.getLogger(__name__)

# ESM-2 vocabulary in id order (ids 0-32): <cls>=0, <pad>=1, <eos>=2, <unk>=3, <mask>=32.
ESM_VOCAB = [
    "<cls>",
    "<pad>",
    "<eos>",
    "<unk>",
    "L",
    "A",
    "G",
    "V",
    "S",
    "E",
    "R",
    "T",
    "I",
    "D",
    "P",
    "K",
    "Q",
    "N",
    "F",
    "Y",
    "M",
    "H",
    "W",
    "C",
    "X",
    "B",
    "U",
    "Z",
    "O",
    ".",
    "-",
    "<null_1>",
    "<mask>",
]
CLS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 32
# Ids of the 20 standard amino acids (L..C): the replacement pool for MLM's "random token" branch.
STANDARD_AA_IDS = tuple(range(4, 24))

# Published ESM-2 sizes: (layers, hidden, heads). `esm2_tiny` is not a published model: a CPU smoke-test size.
ESM2_SIZES = {
    "esm2_t6_8M": (6, 320, 20),
    "esm2_t12_35M": (12, 480, 20),
    "esm2_t30_150M": (30, 640, 20),
    "esm2_t33_650M": (33, 1280, 20),
    "esm2_t36_3B": (36, 2560, 40),
    "esm2_t48_15B": (48, 5120, 40),
    "esm2_tiny": (2, 64, 4),
}
ESM2_MAX_POSITIONS = 1026  # 1022 residues + <cls> + <eos>
# transformers' own attention implementations of EsmForMaskedLM, then faesm (its own environment: transformers <= 4.53).
HF_ATTENTION = ("sdpa", "flash_attention_2", "flex_attention", "eager")
ATTENTION_CHOICES = ("auto", *HF_ATTENTION, "faesm")
# Buffers that a back-end or transformers version stores and another rebuilds itself (rotary frequencies, position
# ids): transformers 5 keeps one `esm.rotary_embeddings.inv_freq`, 4.x one per layer.
REBUILT_BUFFERS = ("position_ids", "inv_freq")
IGNORE_INDEX = -100  # label of a position the loss skips (PyTorch cross_entropy's default ignore_index)


class ModelConfigError(ValueError):
    """The model section of the config names something that cannot be built."""


def flash_attn_available() -> bool:
    """True when the flash-attn CUDA kernels import (never on a CPU-only machine)."""
    try:
        import flash_attn  # noqa: F401
    except Exception:  # a broken CUDA build raises more than ImportError
        return False
    return torch.cuda.is_available()


def transformers_has_sdpa_esm() -> bool:
    """transformers' ESM has SDPA (and the attention-interface back-ends) from 4.56 on."""
    return Version(transformers.__version__) >= Version("4.56")


def faesm_available() -> bool:
    """True when faesm imports next to the installed transformers (0.1.1 needs transformers <= 4.53)."""
    try:
        _import_faesm()
    except Exception:
        return False
    return True


def _import_faesm():
    # faesm prints a multi-line warning to stdout when flash-attn is missing; we log one line instead.
    with contextlib.redirect_stdout(io.StringIO()):
        from faesm.esm import FAEsmForMaskedLM
    return FAEsmForMaskedLM


# The EsmConfig fields every ESM-2 size shares (fair-esm's ESM-2 architecture), all set so no library default leaks in.
ESM2_FIXED_FIELDS = {
    "vocab_size": len(ESM_VOCAB), "mask_token_id": MASK_ID, "pad_token_id": PAD_ID, "cls_token_id": CLS_ID,
    "eos_token_id": EOS_ID, "bos_token_id": None, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0, "max_position_embeddings": ESM2_MAX_POSITIONS, "initializer_range": 0.02,
    "layer_norm_eps": 1e-5, "position_embedding_type": "rotary",
    "rope_theta": 10000.0,  # ESM-2's rotary base (a field since transformers 5)
    "use_cache": False, "is_decoder": False, "add_cross_attention": False, "chunk_size_feed_forward": 0,
    "emb_layer_norm_before": False, "token_dropout": True, "is_folding_model": False, "esmfold_config": None,
    "vocab_list": None, "tie_word_embeddings": True, "architectures": ["EsmForMaskedLM"],
}  # fmt: skip


def esm2_config(
    model_name: str,
    max_position_embeddings: int | None = None,
    hidden_dropout_prob: float | None = None,
    attention_probs_dropout_prob: float | None = None,
) -> EsmConfig:
    """EsmConfig for an ESM-2 size name or a local checkpoint dir; every field set so no library default leaks in."""
    local = Path(model_name)
    if (local / "config.json").is_file():
        config = EsmConfig.from_pretrained(local)
    elif model_name in ESM2_SIZES:
        layers, hidden, heads = ESM2_SIZES[model_name]
        size = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads}
        config = EsmConfig(**ESM2_FIXED_FIELDS, **size, intermediate_size=4 * hidden)
    else:
        known = ", ".join(ESM2_SIZES)
        raise ModelConfigError(f"model_name {model_name!r} is neither a local dir with config.json nor one of: {known}")
    if max_position_embeddings is not None and max_position_embeddings != config.max_position_embeddings:
        raise ModelConfigError(
            f"model.max_position_embeddings={max_position_embeddings} does not match {model_name} "
            f"({config.max_position_embeddings})"
        )
    if hidden_dropout_prob is not None:
        config.hidden_dropout_prob = float(hidden_dropout_prob)
    if attention_probs_dropout_prob is not None:
        config.attention_probs_dropout_prob = float(attention_probs_dropout_prob)
    return config


def save_tokenizer(out_dir: str | Path) -> EsmTokenizer:
    """Write the ESM tokenizer files (vocab.txt + tokenizer configs) to out_dir and return the tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.txt"
    vocab_file.write_text("\n".join(ESM_VOCAB) + "\n")
    tokenizer = EsmTokenizer(str(vocab_file))
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def resolve_attention(attention: str) -> str:
    """The back-end to build: `auto` is flash_attention_2 where flash-attn imports on CUDA, else sdpa.

    Raises ModelConfigError (one line) for an unknown name or a back-end that cannot run here.
    """
    if attention not in ATTENTION_CHOICES:
        hint = " (faesm's flash/SDPA paths are now model.attention=faesm)" if attention == "flash" else ""
        raise ModelConfigError(
            f"model.attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}{hint}"
        )
    if attention == "auto":
        if not transformers_has_sdpa_esm():  # transformers <= 4.55 (the faesm environment): faesm's SDPA path
            return "faesm" if faesm_available() else "eager"
        return "flash_attention_2" if flash_attn_available() else "sdpa"
    if attention == "faesm" and not faesm_available():
        raise ModelConfigError(
            "model.attention=faesm needs faesm 0.1.1, which imports only with transformers <= 4.53: use its own "
            "environment (make setup-faesm; requirements-faesm.txt), or model.attention=sdpa"
        )
    if attention == "flash_attention_2" and not flash_attn_available():
        raise ModelConfigError("model.attention=flash_attention_2 needs flash-attn and a CUDA GPU (use sdpa here)")
    return attention


def check_attention_dropout(config: EsmConfig, backend: str, attention: str | None = None) -> None:
    """Refuse attention dropout on a back-end that would silently drop it.

    faesm 0.1.1 never passes dropout_p to SDPA or flash-attn; transformers' own back-ends all apply it.
    """
    p = config.attention_probs_dropout_prob or 0.0
    if p > 0 and backend == "faesm":
        raise ModelConfigError(
            f"model.attention_probs_dropout_prob={p} would be ignored: faesm applies no attention dropout; "
            "use model.attention: sdpa (or eager), or set model.attention_probs_dropout_prob to 0"
        )


def build_model(
    config: EsmConfig, attention: str = "auto", weights: str | Path | None = None, for_training: bool = True
) -> torch.nn.Module:
    """transformers' EsmForMaskedLM with the chosen attention (faesm's model for `faesm`); optional weights file.

    The config is copied: transformers records the attention implementation in the config it is given.
    Raises ModelConfigError (one line) for a back-end that cannot run here or weights that do not fit.
    """
    backend = resolve_attention(attention)
    if for_training:  # dropout is off at inference, so faesm computes the same thing there
        check_attention_dropout(config, backend, attention)
    config = copy.deepcopy(config)
    if backend == "faesm":
        model = _build_faesm(config)
    else:
        try:
            model = AutoModelForMaskedLM.from_config(config, attn_implementation=backend)
        except (ValueError, ImportError) as err:  # e.g. sdpa with transformers < 4.56: a multi-line message
            raise ModelConfigError(
                f"model.attention={backend}: transformers {transformers.__version__} cannot build it "
                f"({str(err).splitlines()[0][:160]})"
            ) from err
    log.info("model: %s, attention=%s, %.1fM parameters", type(model).__name__, backend, count_parameters(model) / 1e6)
    if weights is not None:
        load_weights(model, weights)
    return model


def _build_faesm(config: EsmConfig) -> torch.nn.Module:
    """faesm's FAEsmForMaskedLM: flash-attn where it imports on CUDA, else its SDPA path; same state-dict keys."""
    config.use_fa = flash_attn_available()
    # faesm builds its tokenizer from config._name_or_path; point it at a throwaway local copy (no hub).
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        save_tokenizer(tokenizer_dir)
        config._name_or_path = tokenizer_dir
        # faesm overwrites hidden_dropout_prob with its `dropout` argument (default 0.1): pass ours through.
        model = _import_faesm()(config, dropout=config.hidden_dropout_prob)
    model.config._name_or_path = ""
    return model


def load_weights(model: torch.nn.Module, weights: str | Path) -> None:
    """Load a weights file into `model` (tied decoder and rebuilt buffers may be absent); ModelConfigError if unfit."""
    state = read_state_dict(weights)
    expected = model.state_dict()
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ModelConfigError(f"{weights}: shapes do not fit the model config (e.g. {wrong[0]})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.decoder.weight" and not k.endswith(REBUILT_BUFFERS)]
    unexpected = [k for k in unexpected if not k.endswith(REBUILT_BUFFERS)]
    if missing or unexpected:
        raise ModelConfigError(f"{weights}: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()


def _plain_key(name: str) -> str:
    # transformers 5's save_pretrained writes LayerNorm weight/bias under the legacy names gamma/beta (and maps
    # them back when it loads); the module's state dict and the published ESM-2 folders use weight/bias.
    for legacy, plain in ((".gamma", ".weight"), (".beta", ".bias")):
        if name.endswith(legacy):
            return name[: -len(legacy)] + plain
    return name


def read_state_dict(weights: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of `model.safetensors` or a `pytorch_model.bin` state dict (torch.load(weights_only=True): no pickle
    code runs), keys in the module's weight/bias naming. Raises ModelConfigError (one line) for an unreadable file."""
    weights = Path(weights)
    try:
        if weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, zip, unpickling errors: all mean "not a readable weights file"
        raise ModelConfigError(f"{weights}: cannot be read as weights ({str(err).splitlines()[0]})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelConfigError(f"{weights}: not a state dict of tensors")
    return {_plain_key(k): v for k, v in state.items()}


def weights_file(model_dir: str | Path) -> Path | None:
    """The weights of a local model folder: model.safetensors, else pytorch_model.bin; None when it has neither."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (Path(model_dir) / name).is_file():
            return Path(model_dir) / name
    return None


def load_pretrained(model_dir: str | Path, attention: str = "auto") -> torch.nn.Module:
    """Load a model folder (config.json + model.safetensors or pytorch_model.bin) with the chosen attention back-end."""
    model_dir = Path(model_dir)
    weights = weights_file(model_dir)
    if weights is None:
        raise ModelConfigError(f"{model_dir}: holds neither model.safetensors nor pytorch_model.bin")
    return build_model(esm2_config(str(model_dir)), attention, weights=weights, for_training=False)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def masked_lm_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over masked positions from the full logits [B, L, 33] (the plain-transformers way)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
    return F.cross_entropy(
        logits.float().view(-1, logits.size(-1)),
        batch["labels"].view(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


class MaskedLMLoss(torch.nn.Module):
    """Wraps an ESM masked-LM so one forward returns the loss; DDP wraps this module.

    The LM head (dense + GELU + LayerNorm + decoder) runs only on the masked positions (about 20% of the tokens)
    instead of on every position as `EsmForMaskedLM.forward` does: the same loss, less work.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, reduction: str = "mean") -> torch.Tensor:
        """input_ids, attention_mask, labels: [B, L] int64; returns the mean (or summed) loss over masked tokens."""
        hidden = self.model.esm(input_ids, attention_mask=attention_mask)[0]  # [B, L, hidden]
        chosen = labels != IGNORE_INDEX
        logits = self.model.lm_head(hidden[chosen])  # [n_masked, vocab]
        return F.cross_entropy(logits.float(), labels[chosen], reduction=reduction)


def apply_speed_switches(model: torch.nn.Module, activation_checkpointing: bool, compile_scope: str | None) -> None:
    """Activation checkpointing per layer (transformers' own switch) and torch.compile, both in place.

    `Module.compile()` compiles in place, so state-dict keys stay as they are: compiled and uncompiled runs read
    each other's checkpoints. compile_scope: None (off), "blocks" (each encoder layer) or "model".
    """
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile_scope == "blocks":
        for layer in model.esm.encoder.layer:
            layer.compile()
    elif compile_scope == "model":
        model.compile()
