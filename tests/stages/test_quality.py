"""Quality filter: each reject reason on a clip built to trigger it, and a clip that passes."""

from __future__ import annotations

import numpy as np
import pytest

from dreamstereo.stages.quality import QualityConfig, decide, score_quality
from dreamstereo.types import RejectReason
from tests.videos import moving_pattern

CFG = QualityConfig()


def _good():
    frames = moving_pattern(9, 64, 96)
    disparity = np.tile(np.linspace(1.0, 2.0, 96), (9, 64, 1))
    mask = np.zeros((9, 64, 96), bool)
    mask[:, :, 40:45] = True  # about 5 %
    return frames, disparity, mask


def test_a_good_clip_is_kept_with_its_scores():
    frames, disparity, mask = _good()
    scores = score_quality(frames, disparity, mask)
    assert scores.mask_ratio == pytest.approx(5 / 96)
    assert scores.disparity_range == pytest.approx(0.5)
    assert scores.motion > CFG.min_motion and scores.max_cut_score < CFG.scene_cut
    assert decide(scores, CFG).keep


@pytest.mark.parametrize("case,reason", [
    ("static", RejectReason.STATIC),
    ("blank", RejectReason.STATIC),
    ("cut", RejectReason.SCENE_CUT),
    ("flat_depth", RejectReason.DEGENERATE_DEPTH),
    ("nan_depth", RejectReason.DEGENERATE_DEPTH),
    ("mask_low", RejectReason.MASK_RATIO_LOW),
    ("mask_high", RejectReason.MASK_RATIO_HIGH),
    ("small", RejectReason.TOO_SMALL),
])
def test_each_reason(case, reason):
    frames, disparity, mask = _good()
    if case == "static":
        frames = np.repeat(frames[:1], 9, axis=0)
    elif case == "blank":
        frames = np.full_like(frames, 128)
    elif case == "cut":
        other = moving_pattern(9, 64, 96, seed=5) // 4  # a darker, different shot
        frames = np.concatenate([frames[:4], other[4:]])
    elif case == "flat_depth":
        disparity = np.full_like(disparity, 3.0)
    elif case == "nan_depth":
        disparity[0, 0, 0] = np.nan
    elif case == "mask_low":
        mask[:] = False
    elif case == "mask_high":
        mask[:, :, :60] = True
    elif case == "small":
        frames, disparity, mask = frames[:, :8, :8], disparity[:, :8, :8], mask[:, :8, :8]
    verdict = decide(score_quality(frames, disparity, mask), CFG)
    assert not verdict.keep and verdict.reason is reason


def test_mask_checks_can_wait_until_pairs_exist():
    frames, disparity, _ = _good()
    scores = score_quality(frames, disparity, None)
    assert decide(scores, CFG, check_mask=False).keep
    assert decide(scores, CFG).reason is RejectReason.MASK_RATIO_LOW


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_depth_scores_of_a_long_clip_equal_the_whole_clip_formula(dtype):
    """Issue 12: the depth scores are taken a few frames at a time; the values are those of the whole-clip
    formula (range over largest magnitude), negative values and a NaN frame far into the clip included."""
    rng = np.random.default_rng(2)
    frames = moving_pattern(21, 32, 48)
    relative = (rng.standard_normal((21, 32, 48)) * 2 - 3).astype(dtype)
    scores = score_quality(frames, relative, None)
    expected = float(relative.max() - relative.min()) / float(np.abs(relative).max())
    assert scores.disparity_finite and scores.disparity_range == expected
    relative[20, 5, 5] = np.nan
    scores = score_quality(frames, relative, None)
    assert (scores.disparity_finite, scores.disparity_range) == (False, 0.0)
