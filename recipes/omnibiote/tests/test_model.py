"""Model behaviour: pooling against manual computations, attention paths, packing, save/load."""

import pytest
import torch

from model import OmniBioTA, OmniBioTAConfig, mup_lr


def tiny_model(**overrides) -> OmniBioTA:
    torch.manual_seed(0)
    config = OmniBioTAConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, ctx_len=24, attn_impl="sdpa", **overrides)
    model = OmniBioTA(config).eval()
    torch.nn.init.normal_(model.lm_head.weight)  # the muP head starts at zero; give the logits something to show
    return model


def padded_batch():
    """Row 0 full length, row 1 padded after 15 tokens (pad id 0), row 2 padded after 6."""
    torch.manual_seed(1)
    ids = torch.randint(3, 40, (3, 24))
    ids[1, 15:] = 0
    ids[2, 6:] = 0
    return ids, [24, 15, 6]


@torch.no_grad()
def test_encode_methods_match_manual_pooling_of_each_unpadded_sequence():
    model = tiny_model()
    ids, lengths = padded_batch()
    for method in ("mean", "first", "last", "max", "all"):
        pooled = model.encode(ids, method=method)
        for row, length in enumerate(lengths):
            alone = model.hidden_states(ids[row : row + 1, :length])[0]  # no padding at all
            expected = {
                "mean": alone.mean(0),
                "first": alone[0],
                "last": alone[-1],
                "max": alone.max(0).values,
            }.get(method)
            if method == "all":
                torch.testing.assert_close(pooled[row, :length], alone, atol=1e-5, rtol=1e-4)
                assert pooled[row, length:].abs().sum() == 0
            else:
                torch.testing.assert_close(pooled[row], expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="method"):
        model.encode(ids, method="sum")


@torch.no_grad()
def test_sdpa_and_math_attention_agree():
    model = tiny_model()
    ids, _ = padded_batch()
    docs = torch.zeros_like(ids)
    docs[0, 10:] = 1
    reference = model(ids, docs)
    for block in model.blocks:
        block.attn.impl = "math"
    torch.testing.assert_close(model(ids, docs), reference, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_packed_records_do_not_see_each_other():
    """Two records packed in one row give the hidden states each has alone (rotary is relative)."""
    model = tiny_model()
    torch.manual_seed(2)
    first, second = torch.randint(3, 40, (1, 9)), torch.randint(3, 40, (1, 14))
    packed = torch.cat([first, second], dim=1)
    docs = torch.tensor([[0] * 9 + [1] * 14])
    hidden = model.hidden_states(packed, docs)
    torch.testing.assert_close(hidden[:, :9], model.hidden_states(first), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hidden[:, 9:], model.hidden_states(second), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(model.hidden_states(packed)[:, 9:], hidden[:, 9:], atol=1e-3)  # the mask matters


def test_loss_only_on_labelled_tokens_matches_full_logits():
    model = tiny_model()
    ids, _ = padded_batch()
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 7], labels[2, 2] = 5, 9, 11
    logits = model(ids)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 40), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(model(ids, labels=labels), expected)


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = tiny_model()
    ids, _ = padded_batch()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = OmniBioTA.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
    assert loaded.lm_head.weight.infshape.width_mult() == pytest.approx(32 / 24)  # muP shapes restored
    math_path = OmniBioTA.from_pretrained(tmp_path, attn_impl="math")
    assert math_path.blocks[0].attn.impl == "math"


def test_sequence_longer_than_ctx_len_is_refused():
    with pytest.raises(ValueError, match="ctx_len"):
        tiny_model()(torch.ones(1, 25, dtype=torch.long))


def test_bfloat16_cast_keeps_rotary_tables_exact():
    model = tiny_model()
    ids, _ = padded_batch()
    with torch.no_grad():
        reference = model.hidden_states(ids)
        model.to(torch.bfloat16)
        cast = model.hidden_states(ids)
    assert model.rope_cos.dtype == torch.float32
    torch.testing.assert_close(cast.float(), reference, atol=0.15, rtol=0.1)


def test_bad_head_split_and_lr_rule():
    with pytest.raises(ValueError, match="heads"):
        OmniBioTAConfig(n_embd=30, n_head=4)
    assert mup_lr(0.01, 1024) == pytest.approx(0.01)
    assert mup_lr(0.01, 256) == pytest.approx(0.005)
