"""Stereo output (stages/stereo.py): frame layouts put each eye's known pixels in known places, hole
filling and blending touch only what they should, crossfade weights, the running disparity range."""

from __future__ import annotations

import numpy as np
import pytest

from dreamstereo.stages.stereo import DisparityRange, StereoFormat, blend, compose, crossfade, inpaint_opencv


def _columns(t: int, h: int, w: int, step: int) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 whose column pair ``j`` (columns 2j and 2j+1) is ``step * j`` in every channel:
    squeezing it to half width (area average of each pair) has the exact answer ``step * j`` at column j."""
    values = (step * (np.arange(w) // 2)).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(values[None, None, :, None], (t, h, w, 3)))


def _views(shape=(2, 6, 8, 3)):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (2, *shape), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- compose


def test_compose_layouts_exactly():
    rng = np.random.default_rng(0)
    left, right = rng.integers(0, 256, (2, 1, 6, 9, 3), dtype=np.uint8)
    assert np.array_equal(compose(left, right, "sbs")[:, :, 9:], right)
    assert np.array_equal(compose(left, right, "tb")[:, 6:], right)
    anaglyph = compose(left, right, "anaglyph")
    assert np.array_equal(anaglyph[..., 0], left[..., 0]) and np.array_equal(anaglyph[..., 1:], right[..., 1:])
    assert compose(left, right, "half-sbs").shape == (1, 6, 9, 3)  # odd width: 4 + 5 columns
    with pytest.raises(ValueError, match="share one"):
        compose(left, right[:, :5], "sbs")


def test_full_layouts_put_each_eye_whole_in_its_half():
    left, right = _views()
    sbs, tb = compose(left, right, StereoFormat.SBS), compose(left, right, StereoFormat.TB)
    assert sbs.shape == (2, 6, 16, 3) and sbs.dtype == np.uint8
    assert np.array_equal(sbs[:, :, :8], left) and np.array_equal(sbs[:, :, 8:], right)
    assert tb.shape == (2, 12, 8, 3) and tb.dtype == np.uint8
    assert np.array_equal(tb[:, :6], left) and np.array_equal(tb[:, 6:], right)


def test_anaglyph_takes_red_from_the_left_eye_and_green_blue_from_the_right():
    left = np.zeros((1, 2, 3, 3), np.uint8)
    left[..., 0], left[..., 1], left[..., 2] = 11, 12, 13
    right = np.zeros_like(left)
    right[..., 0], right[..., 1], right[..., 2] = 21, 22, 23
    out = compose(left, right, "anaglyph")
    assert out.shape == left.shape and out.dtype == np.uint8
    assert out.reshape(-1, 3).tolist() == [[11, 22, 23]] * 6


def test_half_side_by_side_squeezes_each_eye_to_half_width():
    left, right = _columns(2, 4, 8, step=10), _columns(2, 4, 8, step=30)
    out = compose(left, right, "half-sbs")
    assert out.shape == (2, 4, 8, 3) and out.dtype == np.uint8  # as wide as one eye
    assert out[0, 0, :, 0].tolist() == [0, 10, 20, 30, 0, 30, 60, 90]  # each column pair averaged, in order
    assert np.array_equal(out, np.broadcast_to(out[:1, :1], out.shape))  # same in every row and frame


def test_half_top_bottom_squeezes_each_eye_to_half_height():
    left = np.swapaxes(_columns(1, 6, 8, step=10), 1, 2)  # (1, 8, 6, 3): row pair j is 10 * j
    right = np.swapaxes(_columns(1, 6, 8, step=30), 1, 2)
    out = compose(np.ascontiguousarray(left), np.ascontiguousarray(right), "half-tb")
    assert out.shape == (1, 8, 6, 3)
    assert out[0, :, 0, 0].tolist() == [0, 10, 20, 30, 0, 30, 60, 90]


@pytest.mark.parametrize("fmt, size, axis, first", [("half-sbs", 9, 2, 4), ("half-tb", 7, 1, 3)])
def test_half_layouts_of_an_odd_size_give_the_left_eye_the_smaller_half(fmt, size, axis, first):
    shape = [1, 4, 4, 3]
    shape[axis] = size
    left, right = np.full(shape, 40, np.uint8), np.full(shape, 200, np.uint8)
    out = compose(left, right, fmt)
    assert out.shape == tuple(shape)
    line = out[0, :, 0, 0] if axis == 1 else out[0, 0, :, 0]
    assert line.tolist() == [40] * first + [200] * (size - first)


def test_compose_accepts_the_enum_and_its_value_alike():
    left, right = _views()
    for fmt in StereoFormat:
        assert np.array_equal(compose(left, right, fmt), compose(left, right, fmt.value))


def test_compose_refuses_an_unknown_layout_and_views_that_are_not_one_video_shape():
    left, right = _views()
    with pytest.raises(ValueError, match="'side-by-side' is not a valid StereoFormat"):
        compose(left, right, "side-by-side")
    with pytest.raises(ValueError, match=r"share one \(T, H, W, 3\) shape, got \(2, 6, 8, 3\) and \(1, 6, 8, 3\)"):
        compose(left, right[:1], "tb")
    with pytest.raises(ValueError, match="share one"):  # one image, not a frame sequence
        compose(left[0], right[0], "sbs")


# ----------------------------------------------------------------------------------------- inpaint_opencv


def test_inpaint_opencv_fills_only_the_holes_and_leaves_the_input_alone():
    frames = np.full((3, 12, 12, 3), 90, np.uint8)
    frames[1, :, 4:] = 160  # frame 1: two flat parts
    mask = np.zeros((3, 12, 12), bool)
    mask[0, 4:7, 2:5] = True  # a hole inside a flat area
    mask[1, 5:7, 8:11] = True  # a hole 4+ px inside the right part of frame 1
    before = frames.copy()
    out = inpaint_opencv(frames, mask)
    assert np.array_equal(frames, before)  # the input is not modified
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert np.array_equal(out[~mask], frames[~mask])  # outside the holes, unchanged
    # Holes take their surroundings (Telea's gradient-weighted average of flat neighbours: within a few levels).
    filled = [out[k][mask[k]].astype(int) for k in (0, 1)]
    assert np.abs(filled[0] - 90).max() <= 3 and np.abs(filled[1] - 160).max() <= 3
    assert np.array_equal(out[2], frames[2])  # a frame without holes is left as it was


def test_inpaint_opencv_replaces_what_was_under_the_hole():
    frames = np.full((1, 16, 16, 3), 50, np.uint8)
    frames[0, 6:10, 6:10] = 255  # garbage under the hole
    mask = np.zeros((1, 16, 16), bool)
    mask[0, 6:10, 6:10] = True
    out = inpaint_opencv(frames, mask)
    assert np.abs(out.astype(int) - 50).max() <= 3  # nothing of the 255 under the hole survives


# ------------------------------------------------------------------------------------------------ blend


def test_blend_uses_the_fill_inside_and_feathers_outside():
    base, fill = np.zeros((1, 1, 9, 3), np.uint8), np.full((1, 1, 9, 3), 200, np.uint8)
    mask = np.zeros((1, 1, 9), bool)
    mask[0, 0, 4] = True
    hard, soft = blend(base, fill, mask, 0), blend(base, fill, mask, 2)
    assert hard[0, 0, :, 0].tolist() == [0, 0, 0, 0, 200, 0, 0, 0, 0]
    assert soft[0, 0, 4, 0] == 200 and 0 < soft[0, 0, 3, 0] < 200 and soft[0, 0, 3, 0] > soft[0, 0, 2, 0]
    assert soft[0, 0, 0, 0] == 0


def test_blend_without_feather_is_an_exact_select_per_pixel_and_frame():
    rng = np.random.default_rng(1)
    base, fill = rng.integers(0, 256, (2, 2, 5, 6, 3), dtype=np.uint8)
    mask = rng.random((2, 5, 6)) < 0.3
    for feather in (0, -3):  # a negative feather is no feather
        out = blend(base, fill, mask, feather)
        assert np.array_equal(out[mask], fill[mask]) and np.array_equal(out[~mask], base[~mask])


def test_feathered_blend_is_symmetric_and_falls_with_distance_to_the_base():
    base, fill = np.zeros((1, 9, 15, 3), np.uint8), np.full((1, 9, 15, 3), 240, np.uint8)
    mask = np.zeros((1, 9, 15), bool)
    mask[0, :, 7] = True  # a vertical hole column: the ramp runs along x
    out = blend(base, fill, mask, feather_px=3)[0, 4, :, 0].astype(int)
    assert out[7] == 240  # inside: the fill as is
    assert out[:7].tolist() == out[8:][::-1].tolist()  # the same ramp on both sides
    ramp = out[7:]
    assert all(a > b for a, b in zip(ramp[:4], ramp[1:5]))  # falls with every pixel of distance up to 3
    # The weight is 1 - distance / (feather + 1), so it ends at distance feather + 1 = 4 px; OpenCV's 3x3 L2
    # distance counts a horizontal step as 0.955 px, which leaves 4.5 % of the fill there (11 of 240).
    assert ramp[4] <= 0.05 * 240 and ramp[5:].tolist() == [0] * 3  # from distance 5 on: the base only
    assert blend(base, fill, mask, 3).dtype == np.uint8


# -------------------------------------------------------------------------------------------- crossfade


def test_crossfade_weights():
    previous, current = np.zeros((3, 1, 1, 1), np.uint8), np.full((3, 1, 1, 1), 200, np.uint8)
    assert crossfade(previous, current).ravel().tolist() == [50, 100, 150]


def test_crossfade_of_one_frame_is_the_midpoint_and_keeps_shape_and_dtype():
    previous, current = np.full((1, 2, 3, 3), 10, np.uint8), np.full((1, 2, 3, 3), 30, np.uint8)
    out = crossfade(previous, current)
    assert out.shape == previous.shape and out.dtype == np.uint8 and np.all(out == 20)
    floats = crossfade(np.zeros((4, 2), np.float32), np.ones((4, 2), np.float32))
    assert floats.dtype == np.float32 and floats[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # rounded: .2 .4 .6 .8


def test_crossfade_of_identical_predictions_changes_nothing():
    frames = np.random.default_rng(2).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    assert np.array_equal(crossfade(frames, frames.copy()), frames)


def test_crossfade_refuses_predictions_of_different_shapes():
    with pytest.raises(ValueError, match=r"overlap predictions differ in shape: \(3, 2\) and \(2, 2\)"):
        crossfade(np.zeros((3, 2)), np.zeros((2, 2)))


# -------------------------------------------------------------------------------------- DisparityRange


def test_disparity_range_is_shared_across_windows():
    windows = [np.linspace(0, 10, 100).reshape(1, 10, 10), np.linspace(0, 20, 100).reshape(1, 10, 10)]
    alone, smoothed = DisparityRange(momentum=0.0), DisparityRange(momentum=0.5)
    first = smoothed.normalize(windows[0])
    assert first.min() == 0 and first.max() == 1
    own = alone.normalize(windows[1])[0, 5, 0]  # the second window (twice the range) on its own range
    shared = smoothed.normalize(windows[1])[0, 5, 0]
    assert 0.45 < own < 0.55 and own + 0.1 < shared < 0.9  # the range moved part of the way only


def test_disparity_range_moves_by_its_momentum_exactly():
    # Percentiles (0, 100): the range of a window is its min and max. Window 1: [0, 10]; window 2: [0, 20];
    # with momentum 0.5 the shared range after window 2 is [0, 15].
    rng = DisparityRange(momentum=0.5, percentiles=(0.0, 100.0))
    first = rng.normalize(np.array([[0.0, 2.5, 5.0, 10.0]]))
    assert first.dtype == np.float32 and first.tolist() == [[0.0, 0.25, 0.5, 1.0]]
    second = rng.normalize(np.array([[0.0, 7.5, 15.0, 20.0]]))
    assert (rng.lo, rng.hi) == (0.0, 15.0)
    assert second.tolist() == [[0.0, 0.5, 1.0, 1.0]]  # clipped above the shared range


def test_disparity_range_ignores_non_finite_values_and_maps_them_to_zero():
    rng = DisparityRange(momentum=0.0, percentiles=(0.0, 100.0))
    out = rng.normalize(np.array([[np.nan, 4.0, np.inf, 8.0, -np.inf, 6.0]]))
    assert (rng.lo, rng.hi) == (4.0, 8.0)
    assert out.tolist() == [[0.0, 0.0, 0.0, 1.0, 0.0, 0.5]]


def test_a_window_with_no_range_gives_zeros_and_a_window_with_no_data_keeps_the_old_range():
    rng = DisparityRange(momentum=0.5, percentiles=(0.0, 100.0))
    assert rng.normalize(np.full((2, 3, 3), np.nan)).tolist() == np.zeros((2, 3, 3)).tolist()  # nothing yet
    assert rng.lo is None
    flat = DisparityRange(percentiles=(0.0, 100.0)).normalize(np.full((1, 2, 2), 3.0))
    assert flat.dtype == np.float32 and np.all(flat == 0)  # a flat window: no range to scale by
    rng.normalize(np.array([[0.0, 10.0]]))
    out = rng.normalize(np.array([[np.nan, np.nan]]))  # no finite value: the range stays [0, 10]
    assert (rng.lo, rng.hi) == (0.0, 10.0) and out.tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_disparity_range_refuses_a_momentum_outside_0_1(momentum):
    with pytest.raises(ValueError, match=rf"momentum must be in \[0, 1\), got {momentum}"):
        DisparityRange(momentum=momentum)
