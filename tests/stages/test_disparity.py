"""Disparity normalisation and the per-key random choices."""

from __future__ import annotations

import numpy as np
import pytest

from dreamstereo.stages.disparity import (
    CHUNK_FRAMES,
    DisparityConfig,
    disparity_bounds,
    normalize_disparity,
    sample_max_disparity,
)


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


def _whole_clip_reference(relative, width, max_disparity, convergence):
    """The normalisation as it was written before issue 12: the whole clip in float64 at once."""
    rel = np.asarray(relative, dtype=np.float64)
    finite = np.isfinite(rel)
    if not finite.any():
        return np.zeros(rel.shape, np.float32)
    lo, hi = rel[finite].min(), rel[finite].max()
    rel = np.where(finite, rel, lo)
    norm = (rel - lo) / (hi - lo) if hi - lo > 1e-6 else np.zeros_like(rel)
    return (width * max_disparity * (norm - convergence)).astype(np.float32)


@pytest.mark.parametrize("convergence", [0.0, 0.3])
def test_chunked_normalisation_equals_the_whole_clip(convergence):
    """Issue 12: the clip is normalised a few frames at a time (bounds from the whole clip): bit-identical."""
    rng = np.random.default_rng(4)
    relative = (rng.standard_normal((CHUNK_FRAMES * 2 + 3, 7, 9)) * 3 - 1).astype(np.float32)
    relative[0, 0, 0], relative[9, 2, 3], relative[18, 6, 8] = np.nan, np.inf, -np.inf
    expected = _whole_clip_reference(relative, 640, 0.05, convergence)
    assert np.array_equal(normalize_disparity(relative, 640, 0.05, convergence), expected)
    bounds = disparity_bounds(relative)
    assert bounds == (float(np.nanmin(relative[np.isfinite(relative)])), float(relative[np.isfinite(relative)].max()))
    parts = [normalize_disparity(relative[s:s + 5], 640, 0.05, convergence, bounds=bounds) for s in range(0, 19, 5)]
    assert np.array_equal(np.concatenate(parts), expected)
    assert disparity_bounds(np.full((3, 2, 2), np.nan)) is None
