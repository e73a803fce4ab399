"""Model: architecture table, every attention back-end against eager, exports and published folders that load."""

import pytest
import torch
from conftest import padded_batch
from transformers import EsmForMaskedLM

from export import export_config, export_state_dict
from model import (
    ESM2_SIZES,
    ModelConfigError,
    build_model,
    esm2_config,
    faesm_available,
    load_pretrained,
    read_state_dict,
    resolve_attention,
    save_tokenizer,
    weights_file,
)

FAESM_REASON = "faesm imports only with transformers <= 4.53: run `pytest -m faesm` in .venv-faesm (make setup-faesm)"


@pytest.fixture
def faesm_env():
    """Skip (with the reason) where faesm does not import, e.g. next to transformers 5."""
    pytest.importorskip("faesm.esm", reason=FAESM_REASON, exc_type=ImportError)
    if not faesm_available():
        pytest.skip(FAESM_REASON)


def test_config_table_matches_esm2():
    config = esm2_config("esm2_t33_650M")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (33, 1280, 20)
    assert config.intermediate_size == 5120 and config.vocab_size == 33 and config.max_position_embeddings == 1026
    assert config.position_embedding_type == "rotary" and config.layer_norm_eps == 1e-5
    assert config.hidden_dropout_prob == 0.0 and config.attention_probs_dropout_prob == 0.0
    assert config.token_dropout and not config.emb_layer_norm_before and config.mask_token_id == 32
    assert set(ESM2_SIZES) >= {"esm2_t6_8M", "esm2_t12_35M", "esm2_t30_150M", "esm2_t33_650M"}
    assert esm2_config("esm2_tiny", hidden_dropout_prob=0.1).hidden_dropout_prob == 0.1
    with pytest.raises(ModelConfigError, match="does not match"):
        esm2_config("esm2_t6_8M", max_position_embeddings=2050)
    with pytest.raises(ModelConfigError, match="neither a local dir"):
        esm2_config("esm2_t99_1T")


def backend_param(name):
    """pytest param for one back-end, marked so CI runs faesm in its own environment."""
    return pytest.param(name, marks=[pytest.mark.faesm] if name == "faesm" else [], id=name)


def can_train(backend: str) -> bool:
    """flex_attention has no backward pass on CPU (torch 2.13)."""
    return not (backend == "flex_attention" and not torch.cuda.is_available())


@pytest.mark.parametrize(
    "backend", [backend_param(b) for b in ("sdpa", "flex_attention", "flash_attention_2", "faesm")]
)
def test_every_backend_matches_eager_on_a_padded_batch(backend, request):
    """Same weights, padded batch, fp32: logits (real positions) and, where it trains, gradients within 1e-5."""
    if backend == "faesm":
        request.getfixturevalue("faesm_env")
    try:
        resolve_attention(backend)
    except ModelConfigError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    reference = build_model(esm2_config("esm2_tiny"), attention="eager")
    other = build_model(esm2_config("esm2_tiny"), attention=backend)
    assert set(export_state_dict(other)) == set(export_state_dict(reference))  # one layout for every back-end
    other.load_state_dict(reference.state_dict(), strict=False)
    ids, mask = padded_batch()
    real = mask.bool()
    results = {}
    for name, model in (("eager", reference), (backend, other)):
        model.train(can_train(backend))  # dropout is 0: train mode only enables the backward pass
        with torch.set_grad_enabled(can_train(backend)):
            logits = model(input_ids=ids, attention_mask=mask)["logits"]
        grads = None
        if can_train(backend):
            logits[real].square().mean().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (logits.detach(), grads)
    (expected, expected_grads), (got, got_grads) = results["eager"], results[backend]
    assert (got - expected)[real].abs().max() / expected[real].abs().max() <= 1e-5
    if expected_grads is not None:
        assert got_grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            assert (got_grads[name] - grad).abs().max() <= 1e-5 * max(grad.abs().max().item(), 1e-3), name


@pytest.mark.faesm
def test_faesm_keeps_the_configured_dropout(faesm_env):
    model = build_model(esm2_config("esm2_tiny"), attention="faesm")
    assert type(model).__name__ == "FAEsmForMaskedLM"
    assert model.config.hidden_dropout_prob == 0.0  # faesm's own default would be 0.1


@pytest.mark.faesm
def test_attention_dropout_is_refused_where_faesm_would_ignore_it(faesm_env):
    config = esm2_config("esm2_tiny", attention_probs_dropout_prob=0.3)
    with pytest.raises(ModelConfigError, match="attention_probs_dropout_prob=0.3 would be ignored.*sdpa"):
        build_model(config, attention="faesm")
    build_model(esm2_config("esm2_tiny", attention_probs_dropout_prob=0.0), attention="faesm")  # 0 is fine
    build_model(config, attention="faesm", for_training=False)  # inference: dropout is off anyway


def test_transformers_backends_apply_attention_dropout():
    config = esm2_config("esm2_tiny", attention_probs_dropout_prob=0.3)
    ids, mask = padded_batch()
    model = build_model(config, attention="sdpa").train()
    with torch.no_grad():
        first, second = (model(input_ids=ids, attention_mask=mask).logits for _ in range(2))
    assert not torch.equal(first, second)


def test_unknown_or_unavailable_attention_is_one_clear_error():
    with pytest.raises(ModelConfigError, match="must be one of auto, sdpa, flash_attention_2.*attention=faesm"):
        resolve_attention("flash")
    assert resolve_attention("auto") in ("sdpa", "flash_attention_2")
    if not faesm_available():
        with pytest.raises(ModelConfigError, match="faesm 0.1.1.*transformers <= 4.53.*requirements-faesm.txt"):
            resolve_attention("faesm")


def test_exported_checkpoint_loads_in_transformers_and_the_recipe(tmp_path):
    from export import export_final_model

    torch.manual_seed(1)
    model = build_model(esm2_config("esm2_tiny"), attention="auto").eval()
    export_final_model(model, tmp_path / "final")
    folder = tmp_path / "final"
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)["logits"]
        hf = EsmForMaskedLM.from_pretrained(folder).eval()
        ours = load_pretrained(folder, attention="auto").eval()
        for other in (hf, ours):
            got = other(input_ids=ids, attention_mask=mask)["logits"]
            assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)
    assert (folder / "model.safetensors").is_file() and (folder / "vocab.txt").is_file()
    assert set(read_state_dict(folder / "model.safetensors")) == set(export_state_dict(model))
    assert export_config(model)["architectures"] == ["EsmForMaskedLM"]


def published_layout(tmp_path, safe: bool):
    """A transformers EsmForMaskedLM folder as published on model hubs: config.json + weights (+ vocab.txt)."""
    torch.manual_seed(3)
    reference = EsmForMaskedLM(esm2_config("esm2_tiny")).eval()
    folder = tmp_path / ("safetensors" if safe else "bin")
    reference.save_pretrained(folder)  # transformers 5 writes LayerNorm weights under the legacy gamma/beta names
    if not safe:  # older ESM-2 folders hold pytorch_model.bin (transformers 5 no longer writes one)
        torch.save(reference.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    save_tokenizer(folder)
    return reference, folder


@pytest.mark.parametrize("safe", [True, False])
def test_published_folder_loads_from_safetensors_or_pytorch_model_bin(tmp_path, safe):
    reference, folder = published_layout(tmp_path, safe)
    assert (folder / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    model = load_pretrained(folder, attention="sdpa")  # EsmForMaskedLM(config) defaults to sdpa in transformers 5
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)
    assert weights_file(folder).name == ("model.safetensors" if safe else "pytorch_model.bin")


def test_a_pickle_with_code_is_refused_not_run(tmp_path):
    folder = tmp_path / "evil"
    EsmForMaskedLM(esm2_config("esm2_tiny")).save_pretrained(folder)
    torch.save({"x": torch.zeros(1), "payload": print}, folder / "pytorch_model.bin")  # a callable: needs unpickling
    with pytest.raises(ModelConfigError, match="cannot be read as weights"):
        read_state_dict(folder / "pytorch_model.bin")
