"""Disparity normalisation and the per-key random choices."""

from __future__ import annotations

import numpy as np
import pytest

from dreamstereo.stages.disparity import DisparityConfig, normalize_disparity, sample_max_disparity


def test_normalisation_by_hand():
    relative = np.array([[[2.0, 4.0, 6.0]]])  # (1, 1, 3): normalised to 0, 0.5, 1
    px = normalize_disparity(relative, width=1000, max_disparity=0.05, convergence=0.0)
    assert px.dtype == np.float32 and np.allclose(px, [[[0.0, 25.0, 50.0]]])
    px = normalize_disparity(relative, width=1000, max_disparity=0.05, convergence=0.5)
    assert np.allclose(px, [[[-25.0, 0.0, 25.0]]])  # the middle of the range sits on the screen


def test_normalisation_is_per_clip_not_per_frame():
    relative = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 3.0)])  # two constant frames
    px = normalize_disparity(relative, width=100, max_disparity=0.1, convergence=0.0)
    assert np.allclose(px[0], 0.0) and np.allclose(px[1], 10.0)


def test_degenerate_inputs_do_not_crash():
    assert np.all(normalize_disparity(np.full((2, 3, 3), 7.0), 100, 0.05, 0.0) == 0)
    with_nan = np.array([[[np.nan, 1.0, 3.0]]])
    assert np.allclose(normalize_disparity(with_nan, 100, 0.1, 0.0), [[[0.0, 0.0, 10.0]]])
    assert np.all(normalize_disparity(np.full((1, 2, 2), np.nan), 100, 0.1, 0.0) == 0)


def test_max_disparity_is_seeded_by_key_and_in_range():
    cfg = DisparityConfig(max_disparity=[0.02, 0.08])
    values = [sample_max_disparity(f"clip{k}", cfg) for k in range(200)]
    assert all(0.02 <= v <= 0.08 for v in values)
    assert len(set(values)) == 200 and 0.04 < np.mean(values) < 0.06
    assert sample_max_disparity("clip7", cfg) == values[7]  # same key, same choice
    assert sample_max_disparity("x", DisparityConfig(max_disparity=[0.05, 0.05])) == 0.05


@pytest.mark.parametrize("kwargs", [dict(max_disparity=[0.1, 0.05]), dict(max_disparity=[0.0, 0.1]),
                                    dict(convergence=1.5)])
def test_bad_config(kwargs):
    with pytest.raises(ValueError, match="disparity"):
        DisparityConfig(**kwargs)
