"""CurricularFace on a hand-computed case; the rank-based AUC against scikit-learn."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from metrics import pairwise_distances, rank_auc, same_genome_auc, write_distance_histogram
from model import CurricularFace


def _head_with_angles(degrees, margin, scale=2.0):
    head = CurricularFace(embedding_dim=2, n_classes=len(degrees), scale=scale, margin=margin)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees]))
    return head


def test_curricularface_hand_computed_without_margin():
    # embedding along x; class angles 60, 30 and 90 degrees -> cosines 0.5, 0.866.., 0; true class 0.
    head = _head_with_angles([60, 30, 90], margin=0.0).train()
    logits = head(torch.tensor([[3.0, 0.0]]), torch.tensor([0]))
    t = 0.01 * 0.5  # t starts at 0 and moves 1% toward mean cos(theta_y) before it is used
    c30 = math.sqrt(3) / 2
    expected = [0.5, c30 * (t + c30), 0.0]  # class 1 is harder than the target: reweighted; class 2 is not
    assert head.t.item() == pytest.approx(t)
    assert logits[0].tolist() == pytest.approx([2.0 * v for v in expected], abs=1e-6)


def test_curricularface_hand_computed_with_margin():
    m = 0.3
    head = _head_with_angles([60, 30, 100], margin=m, scale=1.0).train()
    head.t.fill_(0.2)
    logits = head(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    t = 0.99 * 0.2 + 0.01 * 0.5
    target = math.cos(math.radians(60) + m)  # 0.2474..: class 1 (0.866) is harder, class 2 (-0.17) is not
    c30, c100 = math.cos(math.radians(30)), math.cos(math.radians(100))
    assert logits[0].tolist() == pytest.approx([target, c30 * (t + c30), c100], abs=1e-6)
    # past the pi - m threshold the target logit becomes cos(theta) - m sin(m)
    far = _head_with_angles([170, 0], margin=m, scale=1.0).eval()
    far_logits = far(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    assert far_logits[0, 0].item() == pytest.approx(math.cos(math.radians(170)) - m * math.sin(m), abs=1e-6)
    assert far.t.item() == 0.0  # eval mode does not move t


def test_rank_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, size=5000).astype(np.float32)  # many ties
    labels = rng.random(5000) < scores / 40
    for positives in (labels, ~labels):  # the smaller class is positive, then negative
        assert rank_auc(torch.from_numpy(scores), torch.from_numpy(positives)) == pytest.approx(
            roc_auc_score(positives, scores), abs=1e-12
        )
    with pytest.raises(ValueError, match="both positive and negative"):
        rank_auc(torch.ones(3), torch.zeros(3, dtype=torch.bool))


def test_same_genome_auc_matches_sklearn_on_pairs(tmp_path):
    torch.manual_seed(0)
    labels = torch.arange(30).repeat_interleave(4)
    embeddings = torch.randn(30, 8)[labels] + 0.8 * torch.randn(120, 8)
    auc, distances, same = same_genome_auc(embeddings, labels)
    assert distances.numel() == 120 * 119 // 2 and int(same.sum()) == 30 * 6
    i, j = torch.triu_indices(120, 120, 1)  # the pair loop, written out: every unordered pair once
    assert torch.allclose(distances, (embeddings[i] - embeddings[j]).norm(dim=1), atol=1e-4)
    assert torch.equal(same, labels[i] == labels[j])
    assert auc == pytest.approx(roc_auc_score(same.numpy(), -distances.numpy()), abs=1e-12)
    assert 0.5 < auc < 1.0
    write_distance_histogram(tmp_path / "hist.png", distances, same, auc, step=7)
    assert (tmp_path / "hist.png").read_bytes()[:4] == b"\x89PNG" and len(list(tmp_path.iterdir())) == 1


def test_pairwise_distances_upper_triangle_only():
    distances, same = pairwise_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]]), torch.tensor([0, 0, 1]))
    assert distances.tolist() == pytest.approx([5.0, 1.0, math.sqrt(18)])
    assert same.tolist() == [True, False, False]
