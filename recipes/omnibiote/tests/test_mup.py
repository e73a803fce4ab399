"""muP coordinate check: activations stay flat from width 64 to 512 under muP and grow without it."""

from coord_check import coord_check, growth

WIDTHS = (64, 128, 512)
SETTINGS = dict(n_steps=3, lr=1e-2, n_layer=2, batch_size=4, ctx_len=16)


def test_mup_activations_stay_flat_across_widths():
    ratios = growth(coord_check(WIDTHS, use_mup=True, **SETTINGS))
    assert all(0.6 < ratio < 1.6 for ratio in ratios.values()), ratios


def test_standard_parametrisation_activations_grow_with_width():
    results = coord_check(WIDTHS, use_mup=False, **SETTINGS)
    ratios = growth(results)
    hidden = {name: ratio for name, ratio in ratios.items() if name.startswith("block")}
    assert min(hidden.values()) > 2.0, ratios  # every block output grows with width
    assert results[128]["block1"] < results[512]["block1"]
