"""Mask metrics, fly-points and PSNR on hand-made masks with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dreamstereo.stages import metrics


def test_mask_scores_by_hand():
    gt = np.zeros((4, 10), bool)
    gt[:, 2:6] = True  # 16 pixels
    pred = np.zeros((4, 10), bool)
    pred[:, 3:8] = True  # 20 pixels, 12 of them true
    s = metrics.mask_scores(pred, gt)
    assert (s.predicted, s.truth) == (20, 16)
    assert s.precision == pytest.approx(12 / 20)
    assert s.recall == pytest.approx(12 / 16)
    assert s.iou == pytest.approx(12 / 24)


def test_mask_scores_empty_and_shape_mismatch():
    empty = np.zeros((3, 3), bool)
    assert metrics.mask_scores(empty, empty).iou == 1.0
    with pytest.raises(ValueError, match="does not match"):
        metrics.mask_scores(empty, np.zeros((3, 4), bool))


def test_fly_points_count_small_components_only():
    m = np.zeros((2, 20, 20), bool)
    m[0, 1, 1] = True  # 1 px
    m[0, 5:7, 5:7] = True  # 4 px (still a fly-point)
    m[0, 10:13, 10:12] = True  # 6 px
    m[1, 0, 0:5] = True  # 5 px in another frame
    m[1, 19, 19] = True  # 1 px
    assert sorted(metrics.component_sizes(m).tolist()) == [1, 1, 4, 5, 6]
    assert metrics.count_fly_points(m) == 3
    assert metrics.count_fly_points(torch.from_numpy(m)) == 3


def test_psnr_on_valid_pixels_only():
    ref = torch.zeros(1, 3, 4, 4)
    img = ref.clone()
    img[..., 0, :] = 1.0  # a wrong first row
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    assert metrics.psnr(img, ref) == pytest.approx(10 * math.log10(4))  # mse = 1/4
    valid[..., 0, :] = False
    assert metrics.psnr(img, ref, valid) == math.inf
    hwc = img.permute(0, 2, 3, 1)
    assert metrics.psnr(hwc, ref.permute(0, 2, 3, 1)) == pytest.approx(10 * math.log10(4))
    assert math.isnan(metrics.psnr(img, ref, torch.zeros_like(valid)))


def test_ssim_exact_cases():
    from dreamstereo.stages.metrics import SSIM_C1, ssim, ssim_map

    a = np.full((2, 16, 16, 3), 0.25)
    b = np.full((2, 16, 16, 3), 0.75)
    # Constant images: the variance terms are C2 / C2, SSIM is the luminance term exactly.
    expected = (2 * 0.25 * 0.75 + SSIM_C1) / (0.25 ** 2 + 0.75 ** 2 + SSIM_C1)
    assert np.allclose(ssim_map(a, b), expected) and ssim_map(a, b).shape == (2, 16, 16)
    rng = np.random.default_rng(0)
    x = rng.random((16, 16, 3))
    assert ssim(x, x) == pytest.approx(1.0)
    noisy = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)
    noisier = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1)
    assert 1.0 > ssim(noisy, x) > ssim(noisier, x)
    valid = np.zeros((16, 16), bool)
    assert np.isnan(ssim(noisy, x, valid))
    valid[:4] = True
    assert ssim(noisy, x, valid) == pytest.approx(ssim_map(noisy, x)[:4].mean())
