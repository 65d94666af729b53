"""Stereo output: running disparity range, hole filling (OpenCV fallback), blending, frame layouts.

Pure functions over arrays (used by ``dreamstereo convert``): frames are ``(T, H, W, 3)`` uint8 RGB,
masks ``(T, H, W)`` bool with True = hole.
"""

from __future__ import annotations

import enum

import cv2
import numpy as np


class StereoFormat(str, enum.Enum):
    SBS = "sbs"  # left | right, full width each (output twice as wide)
    HALF_SBS = "half-sbs"  # left | right squeezed to half width (output as wide as the input)
    TB = "tb"  # left over right, full height each
    HALF_TB = "half-tb"  # left over right squeezed to half height
    ANAGLYPH = "anaglyph"  # red from the left view, green and blue from the right (red-cyan glasses)


def compose(left: np.ndarray, right: np.ndarray, fmt: StereoFormat | str) -> np.ndarray:
    """Pack a stereo pair ``(T, H, W, 3)`` uint8 into one frame sequence in layout ``fmt``."""
    fmt = StereoFormat(fmt)
    if left.shape != right.shape or left.ndim != 4:
        raise ValueError(f"stereo views must share one (T, H, W, 3) shape, got {left.shape} and {right.shape}")
    t, h, w, _ = left.shape
    if fmt is StereoFormat.SBS:
        return np.concatenate([left, right], axis=2)
    if fmt is StereoFormat.TB:
        return np.concatenate([left, right], axis=1)
    if fmt is StereoFormat.ANAGLYPH:
        return np.concatenate([left[..., :1], right[..., 1:]], axis=3)
    if fmt is StereoFormat.HALF_SBS:
        sizes = [(w // 2, h), (w - w // 2, h)]
        axis = 2
    else:
        sizes = [(w, h // 2), (w, h - h // 2)]
        axis = 1
    halves = [np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in view])
              for view, size in zip((left, right), sizes)]
    return np.concatenate(halves, axis=axis)


def inpaint_opencv(frames: np.ndarray, mask: np.ndarray, radius: int = 3) -> np.ndarray:
    """Fill the holes of each frame with OpenCV's Telea inpainting (the fallback without a model)."""
    out = frames.copy()
    for k in range(len(frames)):
        if mask[k].any():
            out[k] = cv2.inpaint(np.ascontiguousarray(frames[k]), mask[k].astype(np.uint8), radius,
                                 cv2.INPAINT_TELEA)
    return out


def blend(base: np.ndarray, fill: np.ndarray, mask: np.ndarray, feather_px: int = 0) -> np.ndarray:
    """``fill`` inside the mask, ``base`` outside, with a ``feather_px`` soft ramp just outside the mask
    (inside, the fill is always used as is)."""
    if feather_px <= 0:
        return np.where(mask[..., None], fill, base)
    outside = (~mask).astype(np.uint8)
    alpha = np.empty(mask.shape, np.float32)
    for k in range(len(mask)):  # distance to the nearest hole pixel -> weight of the fill
        distance = cv2.distanceTransform(outside[k], cv2.DIST_L2, 3)
        alpha[k] = np.clip(1.0 - distance / (feather_px + 1), 0.0, 1.0)
    alpha = alpha[..., None]
    return np.round(fill * alpha + base * (1.0 - alpha)).astype(np.uint8)


def crossfade(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Join two predictions of the same ``n`` frames (the overlap of consecutive windows): frame ``i`` takes
    ``(i + 1) / (n + 1)`` of ``current`` and the rest of ``previous``, so the result leaves the previous
    window and arrives at the current one in equal steps."""
    if previous.shape != current.shape:
        raise ValueError(f"overlap predictions differ in shape: {previous.shape} and {current.shape}")
    n = len(previous)
    weight = (np.arange(1, n + 1, dtype=np.float32) / (n + 1)).reshape(n, *([1] * (previous.ndim - 1)))
    return np.round(previous * (1 - weight) + current * weight).astype(previous.dtype)


class DisparityRange:
    """A running [lo, hi] of relative disparity over the windows of one video, so that windows share one
    baseline: the 1st/99th percentiles of each window, smoothed by an exponential moving average
    (``momentum`` of the old value; 0 = each window on its own)."""

    def __init__(self, momentum: float = 0.8, percentiles: tuple[float, float] = (1.0, 99.0)):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum, self.percentiles = momentum, percentiles
        self.lo: float | None = None
        self.hi: float | None = None

    def normalize(self, relative: np.ndarray) -> np.ndarray:
        """Update the range with this window and return its disparity scaled to [0, 1] (clipped)."""
        finite = relative[np.isfinite(relative)]
        if finite.size:
            lo, hi = (float(v) for v in np.percentile(finite, self.percentiles))
            if self.lo is None:
                self.lo, self.hi = lo, hi
            else:
                self.lo = self.momentum * self.lo + (1 - self.momentum) * lo
                self.hi = self.momentum * self.hi + (1 - self.momentum) * hi
        if self.lo is None or self.hi - self.lo < 1e-6:
            return np.zeros(relative.shape, np.float32)
        rel = np.where(np.isfinite(relative), relative, self.lo)
        return np.clip((rel - self.lo) / (self.hi - self.lo), 0.0, 1.0).astype(np.float32)
