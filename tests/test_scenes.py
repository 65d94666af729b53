"""The scene generator: analytic masks from geometry, rasterisation, and the mp4 + sidecar writer."""

from __future__ import annotations

import numpy as np
import pytest

from dreamstereo.io import media
from dreamstereo.scenes import Layer, demo_scene, render, step_scene, write_scene
from dreamstereo.types import Direction


def test_step_scene_masks_by_hand():
    scene = step_scene(width=40, height=2, d_back=1.0, d_front=5.0, edge=19.5, front_on_left=True)
    assert scene.disparity[0, 0, 19] == 5.0 and scene.disparity[0, 0, 20] == 1.0
    # right: disocclusion [19.5 - 5, 19.5 - 1) -> 15..18; border: source j + 1 > 39 -> 39
    assert np.flatnonzero(scene.holes[Direction.RIGHT][0, 0]).tolist() == [15, 16, 17, 18, 39]
    # left: foreground x <= 19 lands on x + 5, hiding background x with x + 1 in (19.5, 24.5] -> 20..23;
    # background x = 39 lands on 40, off the frame.
    assert np.flatnonzero(scene.occluded[Direction.LEFT][0, 0]).tolist() == [20, 21, 22, 23, 39]


def test_layers_move_and_camera_pans():
    scene = render([Layer(disparity=1.0, seed=1), Layer(disparity=8.0, x0=10.5, x1=20.5, velocity=2.0, seed=2)],
                   width=64, height=2, num_frames=3, pan=1.0)
    for t in range(3):
        front = np.flatnonzero(scene.disparity[t, 0] == 8.0)
        assert front.tolist() == list(range(11 + 3 * t, 21 + 3 * t))
    # The texture moves with its layer: frame 1 is frame 0 shifted by velocity + pan = 3 px.
    assert np.allclose(scene.frames[1, :, 14:24], scene.frames[0, :, 11:21])


def test_slanted_layer_disparity_and_no_folds():
    scene = render([Layer(disparity=3.0, slope=0.1, seed=1)], width=32, height=1, num_frames=1)
    assert np.allclose(np.diff(scene.disparity[0, 0]), 0.1, atol=1e-5)
    with pytest.raises(ValueError, match="slope"):
        render([Layer(disparity=3.0, slope=1.2)], width=8, height=1, num_frames=1)
    with pytest.raises(ValueError, match="background"):
        render([Layer(disparity=3.0, x0=2.5, x1=5.5)], width=8, height=1, num_frames=1)
    with pytest.raises(ValueError, match="background"):
        render([Layer(disparity=3.0, x1=10.0)], width=16, height=1, num_frames=1)


def test_demo_scene_is_deterministic_and_holes_are_wide():
    a, b = demo_scene(seed=3), demo_scene(seed=3)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.disparity, b.disparity)
    assert a.frames.dtype == np.float32 and a.frames.min() >= 0 and a.frames.max() <= 1
    # Every depth edge is a step of at least 8 px (so disocclusions are that wide where nothing
    # else covers them); elsewhere the planes are smooth.
    steps = np.abs(np.diff(a.disparity, axis=-1))
    assert np.all((steps < 0.1) | (steps >= 8.0))
    assert (steps >= 8.0).any()


def test_write_scene_round_trip(tmp_path):
    scene = demo_scene(width=64, height=48, num_frames=5)
    video, sidecar = write_scene(scene, tmp_path / "my scene.mp4", fps=10)
    assert sidecar.endswith("my scene.disparity.npz")
    frames, fps = media.read_video(video)
    assert frames.shape == (5, 48, 64, 3) and fps == pytest.approx(10)
    assert np.abs(frames.astype(float) - scene.frames_uint8()).mean() < 4  # H.264 at high quality
    disp = media.read_disparity(sidecar)
    assert disp.dtype == np.float32 and np.array_equal(disp, scene.disparity)
