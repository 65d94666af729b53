"""Stage 1 random masks: seeded, within the coverage range, moving."""

from __future__ import annotations

import numpy as np
import pytest

from dreamstereo.training.masks import MaskConfig, MaskKind, random_video_mask


@pytest.mark.parametrize("kind", list(MaskKind))
def test_each_kind_is_seeded_covers_the_range_and_moves(kind):
    cfg = MaskConfig(kinds=[kind])
    moving = 0
    for seed in range(30):
        mask = random_video_mask(9, 64, 96, np.random.default_rng(seed), cfg)
        assert mask.shape == (9, 64, 96) and mask.dtype == bool
        assert np.array_equal(mask, random_video_mask(9, 64, 96, np.random.default_rng(seed), cfg))
        assert cfg.min_coverage <= mask.mean() <= cfg.max_coverage
        moving += not np.array_equal(mask[0], mask[-1])
    assert moving >= 27  # shapes travel over the clip (a drift can round to nothing now and then)


def test_different_seeds_give_different_masks():
    masks = [random_video_mask(5, 32, 32, np.random.default_rng(s)) for s in range(5)]
    assert len({m.tobytes() for m in masks}) == 5


def test_bad_coverage_range_is_named():
    with pytest.raises(ValueError, match="min_coverage"):
        MaskConfig(min_coverage=0.6, max_coverage=0.5)
