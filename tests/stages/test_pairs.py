"""Training pairs: round trip through the view opposite to the synthesized eye, seeded flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamstereo.scenes import demo_scene, step_scene
from dreamstereo.stages.pairs import PairConfig, make_pair, pair_frames, plan_pair
from dreamstereo.stages.warp import double_project
from dreamstereo.types import Direction


def _scene():
    scene = step_scene(width=64, height=6, front_on_left=True)
    return scene.frames_uint8(), scene.disparity, scene


def test_default_pair_goes_through_the_left_view_for_a_right_eye():
    frames, disparity, scene = _scene()
    pair = make_pair(frames, disparity, "k0", PairConfig())
    assert pair.direction is Direction.LEFT and not pair.flipped
    # Same mask as the analytic answer of a left round trip: right of the foreground edge (31.5).
    assert np.array_equal(pair.mask, scene.occluded[Direction.LEFT])
    assert np.flatnonzero(pair.mask[0, 0]).tolist() == list(range(32, 40)) + [62, 63]
    assert pair.clean.dtype == np.uint8 and np.array_equal(pair.clean, frames)
    # Unmasked pixels of the round trip are the clean pixels (integer disparities: exact).
    assert np.array_equal(pair.warped[~pair.mask], frames[~pair.mask])
    assert pair.disparity.dtype == np.float32


def test_pair_matches_double_project_for_a_left_eye():
    frames, disparity, _ = _scene()
    pair = make_pair(frames, disparity, "k0", PairConfig(synthesized_eye=Direction.LEFT))
    expected = double_project(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255,
                              torch.from_numpy(disparity), "right")
    assert pair.direction is Direction.RIGHT and np.array_equal(pair.mask, expected.mask1.numpy())


def test_flip_is_seeded_and_mirrors_everything():
    frames, disparity, _ = _scene()
    cfg = PairConfig(flip_probability=0.5)
    flips = [make_pair(frames, disparity, f"clip{k}", cfg).flipped for k in range(40)]
    assert 5 < sum(flips) < 35
    assert flips == [make_pair(frames, disparity, f"clip{k}", cfg).flipped for k in range(40)]
    always = make_pair(frames, disparity, "any", PairConfig(flip_probability=1.0))
    never = make_pair(frames, disparity, "any", PairConfig())
    assert always.flipped
    assert np.array_equal(always.clean, frames[:, :, ::-1])
    assert np.array_equal(always.disparity, disparity[:, :, ::-1])
    # Mirrored input through the same view: the hole band lands on the mirrored side of the edge.
    assert np.flatnonzero(always.mask[0, 0]).tolist() != np.flatnonzero(never.mask[0, 0]).tolist()


@pytest.mark.parametrize("flip,eye", [(0.0, Direction.RIGHT), (1.0, Direction.RIGHT), (1.0, Direction.LEFT)])
def test_a_clip_paired_chunk_by_chunk_equals_the_whole_clip(flip, eye):
    """Issue 12: the chain pairs a clip a few frames at a time; PBDP is per frame, so the arrays are the
    same as one call on the whole clip (views byte-equal, masks identical), flipped or not."""
    scene = demo_scene(width=96, height=48, num_frames=11, seed=5)
    frames = scene.frames_uint8()
    disparity = scene.disparity * 1.5 - 2.0  # negative values too
    cfg = PairConfig(flip_probability=flip, synthesized_eye=eye)
    whole = make_pair(frames, disparity, "clip-key", cfg)
    plan = plan_pair("clip-key", cfg)
    parts = [pair_frames(frames[s:s + 4], disparity[s:s + 4], plan, cfg) for s in range(0, 11, 4)]
    assert whole.flipped is plan.flipped is (flip == 1.0)
    for name in ("clean", "warped", "mask", "disparity"):
        assert np.array_equal(np.concatenate([getattr(p, name) for p in parts]), getattr(whole, name)), name
    assert whole.mask.any() and not whole.mask.all()  # the comparison covers holes and visible pixels
