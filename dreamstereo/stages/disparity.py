"""Disparity normalisation: relative disparity of a clip -> pixels of a chosen stereo baseline.

``d_px = W * max_disp * (d_norm - convergence)`` where ``d_norm`` is the clip's relative disparity
scaled to [0, 1] (per clip, so a whole clip shares one baseline and nothing flickers), ``max_disp`` a
fraction of the width sampled per clip from a range (default 0.02-0.08, the paper's wide-baseline
range) and ``convergence`` the normalised disparity that lands on the screen plane (0 = everything in
front of it, the usual choice for inpainting data). Random choices are seeded from the sample key, so
a rerun makes identical samples.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from dreamstereo.types import CHUNK_FRAMES  # noqa: F401 (public here: pipeline/clip.py reads it)

RANGE_EPS = 1e-6  # a clip whose relative disparity spans less than this is treated as constant


@dataclasses.dataclass
class DisparityConfig:
    """How relative disparity becomes pixels."""

    max_disparity: list[float] = dataclasses.field(default_factory=lambda: [0.02, 0.08])  # fraction of W: [lo, hi]
    convergence: float = 0.0  # normalised disparity placed at zero pixels (0 = far plane at the screen)

    def __post_init__(self):
        lo, hi = self.max_disparity
        if not 0 < lo <= hi < 1:
            raise ValueError(f"disparity.max_disparity must satisfy 0 < lo <= hi < 1, got {self.max_disparity}")
        if not 0.0 <= self.convergence <= 1.0:
            raise ValueError(f"disparity.convergence must be in [0, 1], got {self.convergence}")


def rng_for(key: str, purpose: str) -> np.random.Generator:
    """A generator seeded from a sample key and a purpose string (stable across runs and machines)."""
    digest = hashlib.sha256(f"{purpose}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_max_disparity(key: str, cfg: DisparityConfig) -> float:
    """Maximum disparity for the clip ``key``, as a fraction of the width, uniform in the configured range."""
    lo, hi = cfg.max_disparity
    return float(rng_for(key, "max_disparity").uniform(lo, hi)) if hi > lo else float(lo)




def disparity_bounds(relative: np.ndarray) -> tuple[float, float] | None:
    """The finite minimum and maximum of a clip's relative disparity, ``None`` when nothing is finite.

    Computed :data:`CHUNK_FRAMES` frames at a time, so no clip-sized temporary is made (issue 12).

    Args:
        relative: ``(T, H, W)`` float relative disparity (any scale).
    """
    lo, hi = np.inf, -np.inf
    for start in range(0, len(relative), CHUNK_FRAMES):
        part = np.asarray(relative[start:start + CHUNK_FRAMES])
        finite = part[np.isfinite(part)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if lo <= hi else None


def normalize_disparity(relative: np.ndarray, width: int, max_disparity: float, convergence: float, *,
                        bounds: tuple[float, float] | None | str = "clip") -> np.ndarray:
    """Relative disparity of a clip (any scale, larger = nearer) -> pixels.

    Args:
        relative: ``(T, H, W)`` float relative disparity; NaN/inf are treated as the clip's minimum.
        width: frame width in pixels.
        max_disparity: fraction of ``width`` that the nearest point of the clip gets (before convergence).
        convergence: normalised disparity mapped to 0 px.
        bounds: the whole clip's :func:`disparity_bounds`, when ``relative`` is only some of its frames
            (the clip is then normalised chunk by chunk with identical results); by default they are
            computed from ``relative``.

    Returns:
        ``(T, H, W)`` float32 disparity in pixels: ``W * max_disparity * (d_norm - convergence)``;
        a constant clip gives a constant ``-W * max_disparity * convergence``.
    """
    if isinstance(bounds, str):
        bounds = disparity_bounds(relative)
    out = np.empty(np.shape(relative), np.float32)
    if bounds is None:
        out[...] = 0.0
        return out
    lo, hi = bounds
    for start in range(0, len(out), CHUNK_FRAMES):  # elementwise: chunking changes no value
        rel = np.asarray(relative[start:start + CHUNK_FRAMES], dtype=np.float64)
        rel = np.where(np.isfinite(rel), rel, lo)
        norm = (rel - lo) / (hi - lo) if hi - lo > RANGE_EPS else np.zeros_like(rel)
        out[start:start + CHUNK_FRAMES] = (width * max_disparity * (norm - convergence)).astype(np.float32)
    return out
