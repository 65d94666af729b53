"""The one call for every warper (stages/warp.py): method dispatch, PBDP, shared argument checks, the training
direction rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamstereo.scenes import step_scene
from dreamstereo.stages.gapw import gapw_warp
from dreamstereo.stages.warp import double_project, training_direction, warp
from dreamstereo.types import Direction, WarpMethod
from tests.stages.test_gapw import _cols, _frames, _random_disparity


def test_training_direction_is_opposite_of_synthesized_eye():
    assert training_direction("right") is Direction.LEFT
    assert training_direction(Direction.LEFT) is Direction.RIGHT
    # And it gives training holes with the inference holes' sidedness: for a right eye the holes of
    # view 2 lie right of a foreground edge; mask 1 of a round trip through the LEFT view does too.
    scene = step_scene(front_on_left=True)
    frames, disparity = scene.tensors()
    inference_holes = _cols(double_project(frames, disparity, "right").mask2[0, 0])
    training_holes = _cols(double_project(frames, disparity, training_direction("right")).mask1[0, 0])
    edge = 31.5
    assert min(j for j in inference_holes if j > 2) > edge - 10  # right of the moved foreground
    assert min(j for j in training_holes if j < 60) > edge  # right of the foreground edge


@pytest.mark.parametrize("method", list(WarpMethod))
def test_every_method_shares_the_call_and_layouts(method):
    frames, disparity = _frames(2, 6, 30, seed=6), _random_disparity(2, 6, 30, seed=6)
    result = double_project(frames, disparity, "left", method=method)
    for name, shape, dtype in (("view2", (2, 3, 6, 30), torch.float32), ("disparity2", (2, 6, 30), torch.float32),
                               ("mask2", (2, 6, 30), torch.bool), ("view1", (2, 3, 6, 30), torch.float32),
                               ("mask1", (2, 6, 30), torch.bool)):
        value = getattr(result, name)
        assert value.shape == shape and value.dtype == dtype, name
        assert torch.isfinite(value.float()).all(), name
    again = double_project(frames, disparity, "left", method=method.value)
    assert torch.equal(again.view1, result.view1) and torch.equal(again.mask1, result.mask1)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(disparity=torch.zeros(1, 4, 9)), "does not match"),
    (dict(frames=torch.zeros(1, 4, 9)), "`frames` must have shape"),
    (dict(frames=torch.zeros(1, 1, 4, 8)), "`frames` must have shape"),
    (dict(disparity=torch.zeros(1, 4, 8, 1)), "`disparity` must have shape"),
    (dict(disparity=torch.full((1, 4, 8), float("nan"))), "NaN/inf"),
    (dict(disparity=torch.full((1, 4, 8), float("inf"))), "NaN/inf"),
    (dict(frames=torch.zeros(1, 3, 4, 8, dtype=torch.uint8)), "`frames` must be float32 or float64"),
    (dict(disparity=torch.zeros(1, 4, 8, dtype=torch.int64)), "`disparity` must be float32 or float64"),
    (dict(frames=torch.zeros(0, 3, 4, 8), disparity=torch.zeros(0, 4, 8)), "empty"),
    (dict(frames=torch.zeros(1, 3, 4, 0), disparity=torch.zeros(1, 4, 0)), "empty"),
    (dict(direction="up"), "`direction='up'` must be one of"),
    (dict(frames=np.zeros((1, 3, 4, 8), np.float32)), "`frames` must be a torch.Tensor"),
])
@pytest.mark.parametrize("fn", [gapw_warp, double_project, warp])
def test_bad_input_raises_value_error_naming_the_argument(fn, kwargs, needle):
    args = dict(frames=torch.zeros(1, 3, 4, 8), disparity=torch.zeros(1, 4, 8), direction="right")
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        fn(args["frames"], args["disparity"], args["direction"])


def test_bad_method_and_delta():
    frames, disparity = torch.zeros(1, 3, 4, 8), torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match="`method='splat'` must be one of"):
        double_project(frames, disparity, method="splat")
    with pytest.raises(ValueError, match="`delta` must be >= 1"):
        gapw_warp(frames, disparity, delta=0.5)
