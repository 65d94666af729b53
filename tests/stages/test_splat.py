"""Forward-splat baselines: exact on whole-pixel shifts, z-order, holes, and their known flaws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamstereo.scenes import step_scene
from dreamstereo.stages.metrics import count_fly_points
from dreamstereo.stages.splat import soft_splat_warp, zbuffer_splat_warp

SPLATS = [soft_splat_warp, zbuffer_splat_warp]


@pytest.mark.parametrize("splat", SPLATS)
@pytest.mark.parametrize("direction,band", [("right", [21, 22, 23]), ("left", [0, 1, 2])])
def test_integer_shift_is_exact(splat, direction, band):
    frames = torch.rand(1, 3, 4, 24)
    view, disp2, mask = splat(frames, torch.full((1, 4, 24), 3.0), direction)
    for row in mask[0]:
        assert np.flatnonzero(row.numpy()).tolist() == band
    if direction == "right":
        assert torch.allclose(view[..., :21], frames[..., 3:], atol=1e-6)
    else:
        assert torch.allclose(view[..., 3:], frames[..., :21], atol=1e-6)
    assert torch.allclose(disp2[~mask], torch.full_like(disp2[~mask], 3.0))


@pytest.mark.parametrize("splat", SPLATS)
def test_nearest_surface_wins_and_step_leaves_a_hole(splat):
    scene = step_scene(front_on_left=False)  # background 2 px left of x = 31.5, foreground 10 px right
    frames, disparity = scene.tensors()
    view, disp2, mask = splat(frames, disparity, "right")
    # The foreground lands on 22..53 and covers the background that lands on 22..29.
    assert torch.all(disp2[0, :, 23:53] > 9.0)
    # Background on the far side of the foreground's right border is a hole band (54..63).
    assert mask[0, :, 55:].all()


def test_soft_splat_mixes_layers_at_edges_where_gapw_does_not():
    from dreamstereo.stages.gapw import gapw_warp

    scene = step_scene(front_on_left=False, d_front=10.5)  # half-pixel landing: bilinear splat blends
    frames, disparity = scene.tensors()
    soft = soft_splat_warp(frames, disparity, "right")
    ours = gapw_warp(frames, disparity, "right")
    visible = ~(soft.mask | ours.mask)
    soft_err = (soft.disparity[visible] - ours.disparity[visible]).abs()
    # Soft splat's disparity of visible pixels is a depth-weighted blend of both layers near the edge.
    assert soft_err.max() > 0.5


def test_zbuffer_splat_scatters_fly_points_where_gapw_has_none():
    # A plane seen stretched (d falls by 0.3 px per px) with a random offset per row: point splatting
    # leaves isolated unfilled pixels; GAPW's steps stay below delta, so only the frame border is a hole.
    from dreamstereo.stages.gapw import gapw_warp

    w = 200
    offsets = torch.rand(16, 1, generator=torch.Generator().manual_seed(0)) * 3
    disparity = (offsets - 4.0 - 0.3 * torch.arange(w)).expand(1, 16, w).contiguous()
    frames = torch.rand(1, 3, 16, w)
    assert count_fly_points(zbuffer_splat_warp(frames, disparity, "right").mask[0]) > 50
    gapw_mask = gapw_warp(frames, disparity, "right").mask[0]
    assert count_fly_points(gapw_mask) == 0 and not gapw_mask[:, 10:].any()  # left border: d < 0


@pytest.mark.parametrize("splat", SPLATS)
def test_invalid_sources_are_absent(splat):
    frames = torch.rand(1, 3, 2, 16)
    valid = torch.ones(1, 2, 16, dtype=torch.bool)
    valid[..., 5:8] = False
    _, _, mask = splat(frames, torch.zeros(1, 2, 16), "right", source_valid=valid)
    assert np.flatnonzero(mask[0, 0].numpy()).tolist() == [5, 6, 7]


@pytest.mark.parametrize("splat", SPLATS)
def test_non_contiguous_inputs(splat):
    frames = torch.rand(1, 3, 16, 24).transpose(2, 3).contiguous().transpose(2, 3)  # strided view
    disparity = (torch.rand(1, 24, 16) * 4).transpose(1, 2)  # (1, 16, 24), not contiguous
    out = splat(frames, disparity, "right")
    ref = splat(frames.contiguous(), disparity.contiguous(), "right")
    assert torch.equal(out.mask, ref.mask) and torch.allclose(out.view, ref.view)


def test_soft_splat_keeps_depth_order_beyond_200_px():
    # Two surfaces 150 px apart in disparity, 250 and 400 px in front of the far plane, land on
    # target 100: the nearer (400 px) must win outright.
    w = 600
    disparity = torch.zeros(1, 1, w)
    disparity[0, 0, 350] = 250.0  # lands on 100
    disparity[0, 0, 500] = 400.0  # lands on 100
    frames = torch.zeros(1, 3, 1, w)
    frames[0, 0, 0, 500] = 1.0  # the near surface is red
    view, disp2, _ = soft_splat_warp(frames, disparity, "right")
    assert view[0, 0, 0, 100] > 0.999 and disp2[0, 0, 100] == pytest.approx(400.0, abs=1e-3)
