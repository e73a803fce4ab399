"""FP8 backend choice, device guards, layer selection and model conversion (fp8.py), all runnable on CPU."""

from __future__ import annotations

import contextlib

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import fp8
from config import ConfigError, load_config, validate
from model import BertForMaskedLM, geneformer_config


def make_cfg(*overrides: str):
    return load_config("l0_sanity", list(overrides))


@pytest.fixture
def hopper(monkeypatch):
    """Pretend a compute-capability 9.0 GPU is present (only the guards look at it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))


def set_backends(monkeypatch, te: bool, torchao: bool) -> None:
    monkeypatch.setattr(fp8.model_module, "te", object() if te else None)
    monkeypatch.setattr(fp8, "torchao_converter", (lambda: lambda *a, **k: None) if torchao else (lambda: None))


def tiny_model(vocab_size: int = 25, hidden: int = 64, intermediate: int = 128) -> BertForMaskedLM:
    config = geneformer_config(
        vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=32,
        hidden_act="relu",
    )
    return BertForMaskedLM(config)


def test_fp8_off_needs_nothing():
    assert fp8.fp8_backend(make_cfg()) is None
    assert fp8.convert_for_fp8(tiny_model(), make_cfg()) == []


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match=r"training.fp8_backend='tensorrt': use one of auto, te, torchao"):
        fp8.fp8_backend(make_cfg("training.fp8_backend=tensorrt"))


@pytest.mark.parametrize("backend", ["auto", "te", "torchao"])
def test_cpu_is_refused_in_one_line(monkeypatch, backend):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = make_cfg("training.use_fp8=true", f"training.fp8_backend={backend}")
    with pytest.raises(ConfigError, match="needs a CUDA GPU with compute capability >= 8.9 \\(running on CPU\\)"):
        validate(cfg)


def test_old_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 0))
    with pytest.raises(ConfigError, match=r"compute capability >= 8.9 \(this GPU has \(8, 0\)\)"):
        fp8.fp8_backend(make_cfg("training.use_fp8=true"))


@pytest.mark.parametrize(
    ("te", "torchao", "te_layers", "expected"),
    [
        (True, True, True, "te"),  # TE imports: still the first choice
        (False, True, False, "torchao"),  # no TE: torchao converts the plain layers
    ],
)
def test_auto_prefers_te_then_torchao(hopper, monkeypatch, te, torchao, te_layers, expected):
    set_backends(monkeypatch, te=te, torchao=torchao)
    cfg = make_cfg("training.use_fp8=true", f"model.use_te_layers={str(te_layers).lower()}")
    assert fp8.fp8_backend(cfg) == expected


@pytest.mark.parametrize(
    ("te", "torchao", "overrides", "message"),
    [
        (True, True, ["model.use_te_layers=false"], "auto runs FP8 in Transformer Engine: set model.use_te_layers"),
        (False, True, ["training.fp8_backend=te"], "fp8_backend=te needs transformer_engine"),
        (True, True, ["training.fp8_backend=torchao", "model.use_te_layers=true"], "set model.use_te_layers=false"),
        (False, False, [], r"fp8_backend=auto needs torchao \(pip install torchao==0.18.0"),
        (True, False, ["training.fp8_backend=torchao"], "fp8_backend=torchao needs torchao"),
        (False, True, ["data.pad_to_multiple_of=8"], "data.pad_to_multiple_of=8: FP8 matmuls need token counts"),
    ],
)
def test_impossible_choices_name_the_fix(hopper, monkeypatch, te, torchao, overrides, message):
    set_backends(monkeypatch, te=te, torchao=torchao)
    with pytest.raises(ConfigError, match=message):
        fp8.fp8_backend(make_cfg("training.use_fp8=true", *overrides))


def test_configs_without_the_key_mean_auto(hopper, monkeypatch):
    set_backends(monkeypatch, te=False, torchao=True)
    values = OmegaConf.to_container(OmegaConf.structured(make_cfg("training.use_fp8=true")))
    del values["training"]["fp8_backend"]  # a config saved before the key existed
    cfg = OmegaConf.create(values)
    assert fp8.fp8_backend(cfg) == "torchao"


def test_layer_selection_skips_fused_qkv_mlm_head_and_odd_dims():
    model = tiny_model(vocab_size=25)
    expected = []
    for index in range(2):
        prefix = f"bert.encoder.layer.{index}."
        expected += [prefix + "attention.output.dense", prefix + "intermediate.dense", prefix + "output.dense"]
    assert fp8.fp8_eligible_layers(model) == expected
    # dims that are not multiples of 16 are never eligible, whatever the name
    assert not fp8.is_fp8_eligible(nn.Linear(64, 24), "bert.encoder.layer.0.intermediate.dense")
    assert not fp8.is_fp8_eligible(nn.Linear(24, 64), "bert.encoder.layer.0.output.dense")
    assert not fp8.is_fp8_eligible(nn.LayerNorm(64), "bert.encoder.layer.0.output.LayerNorm")


def test_conversion_passes_the_filter_to_the_converter(hopper, monkeypatch):
    set_backends(monkeypatch, te=False, torchao=True)
    model, seen = tiny_model(), []

    def fake_converter(module, module_filter_fn):
        seen.extend(name for name, child in module.named_modules() if module_filter_fn(child, name))

    cfg = make_cfg("training.use_fp8=true", "training.fp8_backend=torchao")
    converted = fp8.convert_for_fp8(model, cfg, converter=fake_converter)
    assert converted == seen == fp8.fp8_eligible_layers(model)
    assert len(converted) == 6


def test_model_without_eligible_layers_is_refused(hopper, monkeypatch):
    set_backends(monkeypatch, te=False, torchao=True)
    model = tiny_model(hidden=24, intermediate=40)  # no dimension divisible by 16
    cfg = make_cfg("training.use_fp8=true", "training.fp8_backend=torchao")
    with pytest.raises(ConfigError, match="no Linear layer has dims that are multiples of 16"):
        fp8.convert_for_fp8(model, cfg, converter=lambda *a, **k: None)


def test_real_torchao_swaps_exactly_the_eligible_layers(hopper, monkeypatch):
    """With torchao installed (GPU requirements), the module swap itself also runs on CPU."""
    pytest.importorskip("torchao.float8", reason="torchao is a GPU extra (requirements-gpu.txt)")
    from torchao.float8.float8_linear import Float8Linear

    monkeypatch.setattr(fp8.model_module, "te", None)
    model = tiny_model()
    converted = fp8.convert_for_fp8(model, make_cfg("training.use_fp8=true"))
    swapped = [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]
    assert swapped == converted == fp8.fp8_eligible_layers(tiny_model())


def test_torchao_needs_no_autocast_context(hopper, monkeypatch):
    set_backends(monkeypatch, te=False, torchao=True)
    assert isinstance(fp8.fp8_autocast(make_cfg("training.use_fp8=true")), contextlib.nullcontext)
    assert isinstance(fp8.fp8_autocast(make_cfg()), contextlib.nullcontext)
