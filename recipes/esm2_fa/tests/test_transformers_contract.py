"""What the recipe relies on in transformers, pinned down so that an upgrade that changes it fails here, loudly.

The loop uses transformers for the model only (no Trainer): EsmForMaskedLM's state-dict layout (the published ESM-2
one, so published folders load and exports load in transformers), its numbers for fixed weights, the modules the
loss calls (`.esm`, `.lm_head`, `.esm.encoder.layer`), the attention implementations by name,
`gradient_checkpointing_enable`, and the EsmConfig fields set in model.esm2_config. The reference numbers in
tests/data were computed with transformers 5.25 (eager) and match transformers 4.53.3 (eager and faesm) as well.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import padded_batch
from transformers import EsmConfig

from export import export_config, export_state_dict
from model import MaskedLMLoss, build_model, esm2_config, masked_lm_loss, resolve_attention

DATA = Path(__file__).parent / "data"


def fixed_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Weights drawn from one seeded generator in key order: the same numbers under any transformers version."""
    generator = torch.Generator().manual_seed(1234)
    state = {}
    for name, value in sorted(export_state_dict(model).items()):
        noise = torch.randn(value.shape, generator=generator)
        if ".LayerNorm." in name or "layer_norm" in name:
            state[name] = (1.0 if name.endswith("weight") else 0.0) + 0.1 * noise
        else:
            state[name] = 0.05 * noise
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


def test_state_dict_layout_is_the_published_esm2_one():
    expected = json.loads((DATA / "esm2_tiny_state_dict_keys.json").read_text())
    assert sorted(export_state_dict(build_model(esm2_config("esm2_tiny"), "eager"))) == expected


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_logits_for_fixed_weights_equal_the_recorded_reference(backend):
    reference = json.loads((DATA / "esm2_tiny_reference_logits.json").read_text())
    model = fixed_weights(build_model(esm2_config("esm2_tiny"), backend))
    ids, mask = padded_batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask)["logits"]
    real = mask.bool()
    got = logits.masked_fill(~real[..., None], 0.0)
    assert torch.allclose(got.sum(-1), torch.tensor(reference["row_sums"]), atol=1e-4)
    assert torch.allclose(got[0, :4, :6], torch.tensor(reference["first_logits"]), atol=1e-5)


def test_the_modules_the_loss_calls_exist_and_give_the_full_models_loss():
    config = esm2_config("esm2_tiny")
    model = fixed_weights(build_model(config, "sdpa"))
    assert len(model.esm.encoder.layer) == config.num_hidden_layers
    ids, mask = padded_batch()
    labels = torch.full_like(ids, -100)
    labels[:, 3:9] = ids[:, 3:9]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        hidden = model.esm(ids, attention_mask=mask)[0]
        assert hidden.shape == (3, 40, config.hidden_size)
        assert torch.allclose(MaskedLMLoss(model)(**batch), masked_lm_loss(model, batch), rtol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex_attention"])
def test_the_attention_implementation_is_the_one_asked_for(backend):
    model = build_model(esm2_config("esm2_tiny"), resolve_attention(backend))
    assert model.config._attn_implementation == backend  # no silent fallback to another kernel


def test_gradient_checkpointing_is_the_models_own_switch():
    model = build_model(esm2_config("esm2_tiny"), "sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing


def test_every_config_field_we_set_survives_an_export(tmp_path):
    config = esm2_config("esm2_t6_8M")
    exported = export_config(build_model(esm2_config("esm2_tiny"), "sdpa"))
    (tmp_path / "config.json").write_text(json.dumps(exported))
    loaded = EsmConfig.from_pretrained(tmp_path)
    for key in ("position_embedding_type", "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        assert getattr(loaded, key) == getattr(config, key), key
    assert (loaded.token_dropout, loaded.emb_layer_norm_before, loaded.mask_token_id, loaded.pad_token_id) == (
        True,
        False,
        32,
        1,
    )
    assert loaded.tie_word_embeddings and loaded.max_position_embeddings == 1026 and loaded.hidden_act == "gelu"
