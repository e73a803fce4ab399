"""Model: architecture table, faesm vs transformers logits parity, checkpoints that load in both."""

import pytest
import torch
from transformers import EsmForMaskedLM

from model import (
    ESM2_SIZES,
    ModelConfigError,
    build_model,
    esm2_config,
    faesm_available,
    load_pretrained,
    read_state_dict,
    save_tokenizer,
    weights_file,
)

needs_faesm = pytest.mark.skipif(not faesm_available(), reason="faesm not importable with this transformers")


def padded_batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 24, (3, 40), generator=generator)
    ids[:, 0] = 0
    ids[:, -1] = 2
    ids[1, 25:] = 1  # a shorter sequence: <eos> then padding
    ids[1, 24] = 2
    ids[2, 5:9] = 32  # masked tokens exercise token_dropout's rescaling
    return ids, (ids != 1).long()


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


@needs_faesm
def test_faesm_logits_equal_transformers_with_the_same_weights():
    torch.manual_seed(0)
    reference = EsmForMaskedLM(esm2_config("esm2_tiny")).eval()
    fast = build_model(esm2_config("esm2_tiny"), attention="sdpa").eval()
    assert type(fast).__name__ == "FAEsmForMaskedLM"
    assert set(fast.state_dict()) == set(reference.state_dict())
    fast.load_state_dict(reference.state_dict())
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = fast(input_ids=ids, attention_mask=mask)["logits"]
    real = mask.bool()
    rel_err = (got - expected)[real].abs().max() / expected[real].abs().max()
    assert rel_err <= 1e-5


@needs_faesm
def test_faesm_keeps_the_configured_dropout():
    model = build_model(esm2_config("esm2_tiny"), attention="sdpa")
    assert model.config.hidden_dropout_prob == 0.0  # faesm's own default would be 0.1


@needs_faesm
def test_attention_dropout_is_refused_where_faesm_would_ignore_it():
    config = esm2_config("esm2_tiny", attention_probs_dropout_prob=0.3)
    for attention in ("sdpa", "auto"):
        with pytest.raises(ModelConfigError, match="attention_probs_dropout_prob=0.3 would be ignored.*eager"):
            build_model(config, attention=attention)
    ids, mask = padded_batch()
    eager = build_model(config, attention="eager").train()  # transformers' eager attention applies it
    with torch.no_grad():
        first, second = (eager(input_ids=ids, attention_mask=mask).logits for _ in range(2))
    assert not torch.equal(first, second)
    build_model(esm2_config("esm2_tiny", attention_probs_dropout_prob=0.0), attention="sdpa")  # 0 is fine
    build_model(config, attention="sdpa", for_training=False)  # inference: dropout is off anyway


def test_exported_checkpoint_loads_in_transformers_and_the_recipe(tmp_path):
    torch.manual_seed(1)
    model = build_model(esm2_config("esm2_tiny"), attention="auto").eval()
    model.config.architectures = ["EsmForMaskedLM"]
    model.save_pretrained(tmp_path, safe_serialization=True)
    save_tokenizer(tmp_path)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)["logits"]
        hf = EsmForMaskedLM.from_pretrained(tmp_path).eval()
        ours = load_pretrained(tmp_path, attention="auto").eval()
        for other in (hf, ours):
            got = other(input_ids=ids, attention_mask=mask)["logits"]
            assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "vocab.txt").is_file()


def published_layout(tmp_path, safe: bool):
    """A transformers EsmForMaskedLM folder as published on model hubs: config.json + weights (+ vocab.txt)."""
    torch.manual_seed(3)
    reference = EsmForMaskedLM(esm2_config("esm2_tiny")).eval()
    folder = tmp_path / ("safetensors" if safe else "bin")
    reference.save_pretrained(folder, safe_serialization=safe)
    save_tokenizer(folder)
    return reference, folder


@pytest.mark.parametrize("safe", [True, False])
def test_published_folder_loads_from_safetensors_or_pytorch_model_bin(tmp_path, safe):
    reference, folder = published_layout(tmp_path, safe)
    assert (folder / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()
    model = load_pretrained(folder, attention="eager")
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)
    assert weights_file(folder).name == ("model.safetensors" if safe else "pytorch_model.bin")


def test_a_pickle_with_code_is_refused_not_run(tmp_path):
    folder = tmp_path / "evil"
    EsmForMaskedLM(esm2_config("esm2_tiny")).save_pretrained(folder, safe_serialization=False)
    torch.save({"x": torch.zeros(1), "payload": print}, folder / "pytorch_model.bin")  # a callable: needs unpickling
    with pytest.raises(ModelConfigError, match="cannot be read as weights"):
        read_state_dict(folder / "pytorch_model.bin")
