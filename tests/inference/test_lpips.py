"""LPIPS from local weights: the real AlexNet layout with random weights saved as users' files would be."""

from __future__ import annotations

import numpy as np
import pytest
from dreamstereo.inference.lpips import Lpips


def test_distance_is_zero_for_equal_clips_and_grows_with_noise(lpips_folder):
    lpips = Lpips(lpips_folder)
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    assert lpips(clip, clip) == 0.0
    small = np.clip(clip + rng.normal(0, 4, clip.shape), 0, 255).astype(np.uint8)
    large = np.clip(clip + rng.normal(0, 60, clip.shape), 0, 255).astype(np.uint8)
    assert 0 < lpips(small, clip) < lpips(large, clip)
    assert lpips(large, clip) == pytest.approx(lpips(clip, large), rel=1e-5)


def test_missing_or_incomplete_weights_say_what_to_give(tmp_path, lpips_folder):
    with pytest.raises(FileNotFoundError, match="AlexNet"):
        Lpips(tmp_path / "nothing-here.pth")
    (lpips_folder / "alex.pth").unlink()
    with pytest.raises(ValueError, match="lin0"):
        Lpips(lpips_folder)
