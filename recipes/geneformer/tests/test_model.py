"""The plain model against transformers' BertForMaskedLM, padding, export round trips, TE weight mapping."""

from __future__ import annotations

import pytest
import torch
import transformers

from model import BertForMaskedLM, geneformer_config, hf_to_te_state_dict, te, te_to_hf_state_dict


def tiny_config(hidden_act="relu", **kwargs):
    size = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    return geneformer_config(vocab_size=50, max_position_embeddings=64, hidden_act=hidden_act, **size, **kwargs)


def padded_batch():
    torch.manual_seed(0)
    input_ids = torch.randint(4, 50, (3, 24))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 17:] = 0
    attention_mask[2, 6:] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


@pytest.mark.parametrize("hidden_act", ["relu", "gelu"])
@pytest.mark.smoke
def test_same_logits_as_transformers_bert(hidden_act):
    torch.manual_seed(1)
    ours = BertForMaskedLM(tiny_config(hidden_act)).eval()
    reference = transformers.BertForMaskedLM(tiny_config(hidden_act)).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        got = ours(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-5)


def test_activation_from_config_is_used():
    torch.manual_seed(1)
    relu = BertForMaskedLM(tiny_config("relu")).eval()
    gelu = BertForMaskedLM(tiny_config("gelu")).eval()
    gelu.load_state_dict(relu.state_dict())
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        assert not torch.allclose(relu(input_ids, attention_mask).logits, gelu(input_ids, attention_mask).logits)


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(2)
    model = BertForMaskedLM(tiny_config()).eval()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        batched = model(input_ids, attention_mask).logits[2, :6]
        alone = model(input_ids[2:3, :6]).logits[0]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_masked_logits_only_gives_the_same_loss():
    torch.manual_seed(3)
    model = BertForMaskedLM(tiny_config()).eval()
    input_ids, attention_mask = padded_batch()
    labels = torch.full_like(input_ids, -100)
    labels[0, [1, 5]], labels[1, 3] = input_ids[0, [1, 5]], input_ids[1, 3]
    with torch.no_grad():
        full = model(input_ids, attention_mask, labels=labels)
        sparse = model(input_ids, attention_mask, labels=labels, masked_logits_only=True)
    assert sparse.logits.shape == (3, 50)
    torch.testing.assert_close(sparse.loss, full.loss)
    torch.testing.assert_close(sparse.logits, full.logits[labels != -100])


def test_export_round_trip_ours_and_transformers(tmp_path):
    torch.manual_seed(4)
    model = BertForMaskedLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids, attention_mask).logits
        ours = BertForMaskedLM.from_pretrained(tmp_path).eval()(input_ids, attention_mask).logits
        hf = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
        theirs = hf(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(ours, expected)
    real = attention_mask.bool()
    torch.testing.assert_close(theirs[real], expected[real], atol=2e-5, rtol=1e-5)


def test_te_weight_mapping_round_trip_and_layout():
    model = BertForMaskedLM(tiny_config())
    plain = model.state_dict()
    te_layout = hf_to_te_state_dict(plain)
    prefix = "bert.encoder.layer.1.layer."
    qkv = te_layout[prefix + "self_attention.qkv.weight"]
    assert qkv.shape == (96, 32)
    assert torch.equal(qkv[32:64], plain["bert.encoder.layer.1.attention.self.key.weight"])
    assert torch.equal(
        te_layout[prefix + "layernorm_mlp.fc1_weight"], plain["bert.encoder.layer.1.intermediate.dense.weight"]
    )
    assert torch.equal(
        te_layout[prefix + "layernorm_mlp.layer_norm_weight"],
        plain["bert.encoder.layer.1.attention.output.LayerNorm.weight"],
    )
    assert torch.equal(te_layout[prefix + "layernorm.bias"], plain["bert.encoder.layer.1.output.LayerNorm.bias"])
    assert not any(".attention." in key for key in te_layout)
    te_layout[prefix + "self_attention.proj._extra_state"] = torch.zeros(0)  # TE's FP8 metadata: dropped
    back = te_to_hf_state_dict(te_layout)
    assert back.keys() == plain.keys()
    assert all(torch.equal(back[key], plain[key]) for key in plain)


@pytest.mark.skipif(te is None, reason="transformer_engine does not import here (CPU); runs on a CUDA machine")
def test_te_layers_match_plain_layers():
    torch.manual_seed(5)
    plain = BertForMaskedLM(tiny_config()).cuda().eval()
    te_model = BertForMaskedLM(tiny_config(use_te_layers=True)).cuda().eval()
    missing, unexpected = te_model.load_state_dict(hf_to_te_state_dict(plain.state_dict()), strict=False)
    assert not unexpected and all(key.endswith("_extra_state") for key in missing)
    input_ids, attention_mask = (t.cuda() for t in padded_batch())
    with torch.no_grad():
        expected = plain(input_ids, attention_mask).logits
        got = te_model(input_ids, attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-3, rtol=1e-3)
    back = te_to_hf_state_dict(te_model.state_dict())
    assert all(torch.equal(back[key].cpu(), value.cpu()) for key, value in plain.state_dict().items())


def test_te_path_refused_without_transformer_engine():
    if te is not None:
        pytest.skip("transformer_engine is installed")
    with pytest.raises(ValueError, match="needs transformer_engine"):
        BertForMaskedLM(tiny_config(use_te_layers=True))
