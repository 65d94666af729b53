"""Mask and image metrics for warps: precision / recall / IoU, fly-points, PSNR on valid pixels.

Masks are ``(..., H, W)`` bool arrays or tensors (True = hole); images ``(..., 3, H, W)`` or
``(..., H, W, 3)`` float in [0, 1] (the layout only has to match between the two arguments).
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import torch

FLY_POINT_MAX_PIXELS = 4  # a connected mask component of at most this many pixels is a fly-point


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@dataclasses.dataclass(frozen=True)
class MaskScores:
    """Agreement of a predicted hole mask with a ground-truth mask (pixel counts are totals)."""

    precision: float  # |pred & gt| / |pred| (1.0 when pred is empty)
    recall: float  # |pred & gt| / |gt| (1.0 when gt is empty)
    iou: float  # |pred & gt| / |pred | gt| (1.0 when both are empty)
    predicted: int
    truth: int


def mask_scores(predicted, truth) -> MaskScores:
    """Precision, recall and IoU of ``predicted`` against ``truth`` (bool masks of one shape)."""
    pred, gt = _np(predicted).astype(bool), _np(truth).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"`predicted` shape {pred.shape} does not match `truth` shape {gt.shape}")
    inter, union = int((pred & gt).sum()), int((pred | gt).sum())
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    return MaskScores(
        precision=inter / n_pred if n_pred else 1.0,
        recall=inter / n_gt if n_gt else 1.0,
        iou=inter / union if union else 1.0,
        predicted=n_pred,
        truth=n_gt,
    )


def component_sizes(mask) -> np.ndarray:
    """Pixel counts of the 8-connected components of every ``(H, W)`` slice of ``mask``, concatenated."""
    m = _np(mask).astype(bool)
    sizes = []
    for plane in m.reshape((-1,) + m.shape[-2:]):
        count, _, stats, _ = cv2.connectedComponentsWithStats(plane.astype(np.uint8), connectivity=8)
        sizes.append(stats[1:count, cv2.CC_STAT_AREA])  # label 0 is the background
    return np.concatenate(sizes) if sizes else np.zeros(0, np.int64)


def count_fly_points(mask, max_pixels: int = FLY_POINT_MAX_PIXELS) -> int:
    """Number of mask components of at most ``max_pixels`` pixels (speckle that a warp scattered)."""
    return int((component_sizes(mask) <= max_pixels).sum())


def squared_error(image, reference, valid=None) -> tuple[float, int]:
    """Sum of squared differences of ``image`` and ``reference`` over pixels where ``valid``, and the
    number of values summed (pixels x channels). ``valid`` is a ``(..., H, W)`` bool mask broadcast
    over the channel axis (at -3 or -1, whichever matches). Lets PSNR be accumulated over chunks."""
    a, b = _np(image).astype(np.float64), _np(reference).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"`image` shape {a.shape} does not match `reference` shape {b.shape}")
    err = (a - b) ** 2
    if valid is not None:
        v = _np(valid).astype(bool)
        if a.shape[-3:-2] == (3,) and a.shape[-2:] == v.shape[-2:]:
            v = np.broadcast_to(v[..., None, :, :], a.shape)  # channels first
        else:
            v = np.broadcast_to(v[..., None], a.shape)  # channels last
        err = err[v]
    return float(err.sum()), int(err.size)


def psnr_from_error(total: float, count: int) -> float:
    """PSNR in dB (peak 1.0) from a sum of squared errors over ``count`` values; nan when count is 0."""
    if count == 0:
        return math.nan
    mse = total / count
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def psnr(image, reference, valid=None) -> float:
    """PSNR in dB of ``image`` against ``reference`` (values in [0, 1]) over pixels where ``valid``.

    Returns ``inf`` for identical inputs and ``nan`` with no valid pixel; see :func:`squared_error`.
    """
    return psnr_from_error(*squared_error(image, reference, valid))


SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # Wang et al. 2004, for values in [0, 1]


def ssim_map(image, reference, sigma: float = 1.5) -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004: Gaussian window, sigma 1.5, K1 0.01, K2 0.03) of two
    ``(..., H, W, 3)`` images in [0, 1], averaged over channels: ``(..., H, W)`` float64."""
    a, b = _np(image).astype(np.float64), _np(reference).astype(np.float64)
    if a.shape != b.shape or a.shape[-1] != 3:
        raise ValueError(f"`image` {a.shape} and `reference` {b.shape} must share a (..., H, W, 3) shape")
    lead = a.shape[:-3]
    a, b = a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:])

    def blur(x):
        return np.stack([cv2.GaussianBlur(f, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) for f in x])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_a ** 2 + mu_b ** 2 + SSIM_C1) * (var_a + var_b + SSIM_C2))
    return ssim.mean(axis=-1).reshape(*lead, *a.shape[-3:-1])


def ssim(image, reference, valid=None) -> float:
    """Mean SSIM of ``(..., H, W, 3)`` images in [0, 1] over pixels where ``valid`` (``(..., H, W)``);
    nan with no valid pixel."""
    values = ssim_map(image, reference)
    if valid is not None:
        values = values[_np(valid).astype(bool)]
    return float(values.mean()) if values.size else math.nan
