"""Loading depth weights (stages/weights.py): a local folder or a hub id, and an error saying how to provide them."""

from __future__ import annotations

import pytest

from dreamstereo.stages.depth import DepthAnythingV2
from dreamstereo.stages.weights import DepthWeightsError


def test_missing_weights_say_how_to_provide_them(tmp_path):
    with pytest.raises(DepthWeightsError, match="huggingface-cli download .*depth.weights="):
        DepthAnythingV2("depth-anything/Depth-Anything-V2-Small-hf")  # a hub id, offline
    with pytest.raises(DepthWeightsError, match="not a local folder"):
        DepthAnythingV2(str(tmp_path / "no-such-folder"))
