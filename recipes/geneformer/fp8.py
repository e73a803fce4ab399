"""FP8 training: choose a backend, convert the model for it, and the context to run its forward pass in.

`training.use_fp8` switches FP8 on; `training.fp8_backend` says how:
- `te`: Transformer Engine layers (`model.use_te_layers=true`) under TE's autocast with DelayedScaling;
- `torchao`: torchao's float8 training API (`torchao.float8.convert_to_float8_training`, the path torchtitan uses)
  swaps eligible `nn.Linear` modules of the plain model for `Float8Linear` (dynamic tensorwise scaling). Convert
  before FSDP2's `fully_shard`, which torchao supports;
- `auto` (default): `te` when Transformer Engine imports, `torchao` otherwise.
Both need a CUDA GPU of compute capability >= 8.9 (FP8 tensor cores: Ada, Hopper and later).

`cfg` is the run's settings (config.GeneformerConfig; not imported here, config.py imports this module).
train.py calls three hooks: `fp8_backend(cfg)` while checking the config, `convert_for_fp8(model, cfg)` after
building the model and before sharding it, and `fp8_autocast(cfg)` around each forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

import model as model_module
from biorecipes_shared import ConfigError

FP8_BACKENDS = ("auto", "te", "torchao")
MIN_CAPABILITY = (8, 9)
# FP8 GEMMs (torch._scaled_mm) need every matrix dimension divisible by 16; token counts are padded to it by the
# collator (data.pad_to_multiple_of), weight dims are checked here.
FP8_DIM_MULTIPLE = 16
# BertLayer runs query/key/value as one F.linear over their concatenated weights, so swapped modules there would
# never run. The MLM head runs on the masked tokens only (`masked_logits_only`), a row count that is rarely a multiple
# of 16 as torch._scaled_mm needs, and its decoder's width is the vocabulary (25,426 for Geneformer V1); torchtitan
# keeps the output layer in high precision too.
SKIPPED_PARTS = ("attention.self.", "cls.predictions.")


def torchao_converter() -> Callable | None:
    """torchao's `convert_to_float8_training`, or None when torchao does not import here."""
    try:
        from torchao.float8 import convert_to_float8_training
    except Exception:  # a torchao built for another torch can fail with more than ImportError
        return None
    return convert_to_float8_training


def te_available() -> bool:
    return model_module.te is not None


def check_fp8_device() -> None:
    """ConfigError unless a CUDA GPU with compute capability >= 8.9 is present."""
    if not torch.cuda.is_available():
        raise ConfigError("training.use_fp8=true needs a CUDA GPU with compute capability >= 8.9 (running on CPU)")
    capability = tuple(torch.cuda.get_device_capability())
    if capability < MIN_CAPABILITY:
        raise ConfigError(f"training.use_fp8=true needs compute capability >= 8.9 (this GPU has {capability})")


def fp8_backend(cfg, check_device: bool = True) -> str | None:
    """The FP8 backend this config runs with: "te", "torchao", or None when FP8 is off; ConfigError if it cannot run.

    Configs written before `training.fp8_backend` existed mean `auto`."""
    training = cfg.training
    requested = getattr(training, "fp8_backend", "auto")
    if requested not in FP8_BACKENDS:
        raise ConfigError(f"training.fp8_backend={requested!r}: use one of {', '.join(FP8_BACKENDS)}")
    if not training.use_fp8:
        return None
    if check_device:
        check_fp8_device()
    backend = requested
    if backend == "auto":
        backend = "te" if te_available() else "torchao"
    use_te_layers = bool(cfg.model.use_te_layers)
    if backend == "te":
        if not te_available():
            raise ConfigError(
                "training.fp8_backend=te needs transformer_engine, which does not import here; "
                "use training.fp8_backend=torchao"
            )
        if not use_te_layers:
            raise ConfigError(
                f"training.fp8_backend={requested} runs FP8 in Transformer Engine: set model.use_te_layers=true, "
                "or training.fp8_backend=torchao for the plain layers"
            )
        return backend
    if use_te_layers:
        raise ConfigError("training.fp8_backend=torchao converts the plain layers: set model.use_te_layers=false")
    if cfg.data.pad_to_multiple_of % FP8_DIM_MULTIPLE:
        raise ConfigError(
            f"data.pad_to_multiple_of={cfg.data.pad_to_multiple_of}: FP8 matmuls need token counts that are "
            f"multiples of {FP8_DIM_MULTIPLE}; use data.pad_to_multiple_of=16"
        )
    if torchao_converter() is None:
        raise ConfigError(
            f"training.fp8_backend={requested} needs torchao (pip install torchao==0.18.0; see requirements-gpu.txt)"
        )
    return backend


def is_fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """True for an nn.Linear that torchao should swap: both dims multiples of 16 and not in SKIPPED_PARTS.

    Signature of torchao's `module_filter_fn` (module, fully qualified name)."""
    if not isinstance(module, nn.Linear) or any(part in fqn for part in SKIPPED_PARTS):
        return False
    return module.in_features % FP8_DIM_MULTIPLE == 0 and module.out_features % FP8_DIM_MULTIPLE == 0


def fp8_eligible_layers(model: nn.Module) -> list[str]:
    """Names of the modules `convert_for_fp8` swaps under the torchao backend, in module order."""
    return [name for name, module in model.named_modules() if is_fp8_eligible(module, name)]


def convert_for_fp8(model: nn.Module, cfg, converter: Callable | None = None) -> list[str]:
    """Prepare `model` in place for the configured FP8 backend; returns the names of the converted modules.

    torchao: eligible nn.Linear -> Float8Linear (call before sharding). te: nothing to do (TE layers are FP8
    capable); FP8 off: nothing. `converter` replaces torchao's function (tests)."""
    if fp8_backend(cfg, check_device=False) != "torchao":
        return []
    names = fp8_eligible_layers(model)
    if not names:
        raise ConfigError("training.fp8_backend=torchao: no Linear layer has dims that are multiples of 16")
    (converter or torchao_converter())(model, module_filter_fn=is_fp8_eligible)
    return names


def fp8_autocast(cfg) -> contextlib.AbstractContextManager:
    """The FP8 context for a forward pass: TE's autocast for `te`; none needed for `torchao` or FP8 off."""
    if fp8_backend(cfg, check_device=False) != "te":
        return contextlib.nullcontext()
    from transformer_engine.common.recipe import DelayedScaling

    te = model_module.te
    if hasattr(te, "autocast"):  # TE >= 2.x; fp8_autocast is deprecated there
        return te.autocast(recipe=DelayedScaling())
    return te.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling())
