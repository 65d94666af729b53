"""Quality filter: scores for a clip and a keep/reject verdict with a reason code.

A rejection is a verdict, not an error: the scores are kept with the sample record so thresholds can
be re-tuned offline. ``score_quality`` measures; ``decide`` applies thresholds.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from dreamstereo.types import CHUNK_FRAMES, RejectReason

_SMALL = (64, 36)  # (width, height) thumbnails used for motion and cut scores


@dataclasses.dataclass
class QualityConfig:
    """Thresholds of the filter."""

    mask_ratio: list[float] = dataclasses.field(default_factory=lambda: [0.005, 0.35])  # kept range of M1 share
    min_disparity_range: float = 1e-3  # relative range (max - min) / max|d| below this = degenerate depth
    scene_cut: float = 0.6  # L1 distance of consecutive grey histograms (0..2) above this = a cut
    min_motion: float = 0.3  # mean absolute frame difference (0..255) below this = near-static
    min_contrast: float = 2.0  # mean per-frame standard deviation (0..255) below this = blank
    min_frames: int = 1
    min_short_side: int = 16  # px

    def __post_init__(self):
        lo, hi = self.mask_ratio
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"quality.mask_ratio must satisfy 0 <= lo < hi <= 1, got {self.mask_ratio}")


@dataclasses.dataclass(frozen=True)
class QualityScores:
    """Measured properties of a clip (see :class:`QualityConfig` for units)."""

    frames: int
    short_side: int
    mask_ratio: float
    disparity_finite: bool
    disparity_range: float
    max_cut_score: float
    motion: float
    contrast: float


@dataclasses.dataclass(frozen=True)
class Verdict:
    keep: bool
    reason: RejectReason | None


def _grey_thumbnails(frames: np.ndarray) -> np.ndarray:
    """``(T, h, w) float32`` grey thumbnails of ``(T, H, W, 3) uint8`` frames."""
    return np.stack([cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), _SMALL, interpolation=cv2.INTER_AREA)
                     for f in frames]).astype(np.float32)


def score_quality(frames: np.ndarray, relative_disparity: np.ndarray, mask: np.ndarray | None) -> QualityScores:
    """Score a clip.

    Args:
        frames: ``(T, H, W, 3) uint8``. relative_disparity: ``(T, H, W)`` float (any scale) as the depth
            backend returned it. mask: ``(T, H, W) bool`` M1 of the pair, or None before pairing.
    """
    t, h, w = frames.shape[:3]
    grey = _grey_thumbnails(frames)
    if t > 1:
        diffs = np.abs(np.diff(grey, axis=0)).mean(axis=(1, 2))
        hists = np.stack([np.histogram(g, bins=32, range=(0, 256))[0] for g in grey]).astype(np.float64)
        hists /= hists.sum(axis=1, keepdims=True)
        cut = float(np.abs(np.diff(hists, axis=0)).sum(axis=1).max())
        motion = float(diffs.mean())
    else:
        cut, motion = 0.0, 0.0
    finite, disparity_range = _disparity_spread(relative_disparity)
    return QualityScores(
        frames=t, short_side=min(h, w),
        mask_ratio=float(mask.mean()) if mask is not None else 0.0,
        disparity_finite=finite, disparity_range=disparity_range,
        max_cut_score=cut, motion=motion, contrast=float(grey.std(axis=(1, 2)).mean()),
    )


def _disparity_spread(relative: np.ndarray, chunk_frames: int = CHUNK_FRAMES) -> tuple[bool, float]:
    """Whether all of ``relative`` is finite, and its range relative to its largest magnitude (0 when not
    finite or empty); a few frames at a time, so no clip-sized temporary is made (issue 12)."""
    lo = hi = None
    for start in range(0, len(relative), chunk_frames):
        part = np.asarray(relative[start:start + chunk_frames])
        if not np.isfinite(part).all():
            return False, 0.0
        if part.size:
            part_lo, part_hi = part.min(), part.max()  # scalars of the array's dtype, as before chunking
            lo = part_lo if lo is None else min(lo, part_lo)
            hi = part_hi if hi is None else max(hi, part_hi)
    if lo is None:
        return True, 0.0
    span = float(hi - lo)
    scale = float(max(np.abs(hi), np.abs(lo)))  # = max |d| over the clip, for finite values
    return True, (span / scale if scale > 0 else 0.0)


def decide(scores: QualityScores, cfg: QualityConfig, *, check_mask: bool = True,
           check_depth: bool = True) -> Verdict:
    """Keep or reject, with the first failing reason in a fixed order (cheap, structural checks first)."""
    lo, hi = cfg.mask_ratio
    checks = [
        (scores.frames < cfg.min_frames, RejectReason.TOO_SHORT),
        (scores.short_side < cfg.min_short_side, RejectReason.TOO_SMALL),
        (check_depth and (not scores.disparity_finite or scores.disparity_range < cfg.min_disparity_range),
         RejectReason.DEGENERATE_DEPTH),
        (scores.contrast < cfg.min_contrast or (scores.frames > 1 and scores.motion < cfg.min_motion),
         RejectReason.STATIC),
        (scores.max_cut_score > cfg.scene_cut, RejectReason.SCENE_CUT),
        (check_mask and scores.mask_ratio < lo, RejectReason.MASK_RATIO_LOW),
        (check_mask and scores.mask_ratio > hi, RejectReason.MASK_RATIO_HIGH),
    ]
    for failed, reason in checks:
        if failed:
            return Verdict(False, reason)
    return Verdict(True, None)
