"""Random video masks for Stage 1 (general inpainting): free strokes, boxes and object-like blobs that
move over the clip. Pure numpy + OpenCV; the randomness comes from the generator passed in, which the data
stream seeds per sample (``data.py::sample_rng``).
"""

from __future__ import annotations

import dataclasses
import enum

import cv2
import numpy as np


class MaskKind(str, enum.Enum):
    STROKE = "stroke"  # thick free-hand polylines (as in video-inpainting benchmarks' free-form masks)
    BOX = "box"  # axis-aligned rectangles
    BLOB = "blob"  # filled irregular polygons that drift and wobble, like a moving object


@dataclasses.dataclass
class MaskConfig:
    """Random masks drawn for each Stage-1 sample."""

    kinds: list[MaskKind] = dataclasses.field(default_factory=lambda: list(MaskKind))  # drawn uniformly
    max_shapes: int = 3  # shapes per clip, 1..max_shapes (all of one kind)
    min_coverage: float = 0.05  # fraction of masked pixels over the clip; redrawn outside [min, max]
    max_coverage: float = 0.5
    max_motion: float = 0.3  # how far a shape travels over the clip, as a fraction of the frame size

    def __post_init__(self):
        if not self.kinds or self.max_shapes < 1:
            raise ValueError(f"masks: need >= 1 kind and max_shapes >= 1, got {self.kinds}, {self.max_shapes}")
        if not 0 <= self.min_coverage < self.max_coverage <= 1:
            raise ValueError(f"masks: need 0 <= min_coverage < max_coverage <= 1, got "
                             f"{self.min_coverage}, {self.max_coverage}")


def _trajectory(rng: np.random.Generator, num_frames: int, size: np.ndarray, max_motion: float) -> np.ndarray:
    """``(T, 2)`` pixel offsets (x, y): a straight drift with a little jitter, starting at 0."""
    drift = rng.uniform(-max_motion, max_motion, 2) * size  # total travel over the clip, px
    t = np.linspace(0.0, 1.0, num_frames)[:, None]
    jitter = np.cumsum(rng.normal(0, 0.005, (num_frames, 2)), axis=0) * size
    return t * drift + jitter


def _draw_shape(canvas: np.ndarray, kind: MaskKind, rng: np.random.Generator, num_frames: int,
                max_motion: float) -> None:
    """Draw one moving shape into ``canvas (T, H, W) uint8`` (255 = masked)."""
    t_count, h, w = canvas.shape
    size = np.array([w, h], np.float64)
    short = min(h, w)
    offsets = _trajectory(rng, num_frames, size, max_motion)
    if kind is MaskKind.BOX:
        half = rng.uniform(0.05, 0.25, 2) * size
        centre = rng.uniform(0.1, 0.9, 2) * size
        for k in range(t_count):
            c = centre + offsets[k]
            cv2.rectangle(canvas[k], tuple(int(v) for v in c - half), tuple(int(v) for v in c + half), 255, -1)
    elif kind is MaskKind.STROKE:
        steps = rng.integers(3, 8)
        points = [rng.uniform(0.1, 0.9, 2) * size]
        for _ in range(steps):  # a random walk of segments 5-25% of the frame long
            angle = rng.uniform(0, 2 * np.pi)
            points.append(points[-1] + rng.uniform(0.05, 0.25) * short * np.array([np.cos(angle), np.sin(angle)]))
        points = np.array(points)
        thickness = max(1, int(rng.uniform(0.03, 0.1) * short))
        for k in range(t_count):
            pts = np.round(points + offsets[k]).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(canvas[k], [pts], False, 255, thickness, lineType=cv2.LINE_8)
    else:  # BLOB: radii vary smoothly around the centre and wobble over time
        vertices = 16
        angles = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
        base = rng.uniform(0.08, 0.25) * short
        shape = 1 + 0.35 * np.convolve(np.tile(rng.normal(0, 1, vertices), 3), np.ones(3) / 3, "same")[vertices:2 * vertices]
        wobble = rng.normal(0, 0.08, vertices)
        centre = rng.uniform(0.15, 0.85, 2) * size
        for k in range(t_count):
            phase = k / max(1, t_count - 1)
            radii = base * np.clip(shape + wobble * np.sin(np.pi * phase), 0.3, None)
            c = centre + offsets[k]
            pts = np.stack([c[0] + radii * np.cos(angles), c[1] + radii * np.sin(angles)], axis=1)
            cv2.fillPoly(canvas[k], [np.round(pts).astype(np.int32)], 255)


def random_video_mask(num_frames: int, height: int, width: int, rng: np.random.Generator,
                      cfg: MaskConfig | None = None) -> np.ndarray:
    """A random moving mask for one clip.

    One kind is drawn for the clip (uniformly from ``cfg.kinds``), then 1..``max_shapes`` shapes of it, each
    on its own trajectory. Draws are repeated (up to 20 times) until the masked fraction of the clip lies in
    ``[min_coverage, max_coverage]``; the last draw is returned otherwise.

    Returns:
        ``(T, H, W) bool``, True = pixel to inpaint.
    """
    cfg = cfg or MaskConfig()
    canvas = np.zeros((num_frames, height, width), np.uint8)
    for _ in range(20):
        canvas[:] = 0
        kind = MaskKind(cfg.kinds[rng.integers(len(cfg.kinds))])
        for _ in range(rng.integers(1, cfg.max_shapes + 1)):
            _draw_shape(canvas, kind, rng, num_frames, cfg.max_motion)
        coverage = float(np.mean(canvas > 0))
        if cfg.min_coverage <= coverage <= cfg.max_coverage:
            break
    return canvas > 0
