"""Warp evaluation on real stereo pairs with ground-truth disparity (Middlebury 2005/2006 layout).

A pair folder holds ``view1.png`` / ``view5.png`` (left / right RGB), ``disp1.png`` / ``disp5.png``
(uint8 disparity of the left / right view, pixels = value / 2, 0 = unknown). The ground-truth occlusion
of the left view follows from a left-right check (shared/data/SOURCES.md):
``|disp1(x) - disp5(x - disp1(x))| > 1`` or ``x - disp1(x) < 0``.

Each method makes a double projection of the left view to the right and back (unknown disparity is
filled from the background side first); ``mask1`` is scored against that occlusion, the round trip of
view 1 by PSNR on unmasked pixels, and view 2 against the real right image on pixels that the ground
truth says are visible.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from dreamstereo.config import ConfigError
from dreamstereo.io import media
from dreamstereo.stages import metrics
from dreamstereo.stages.warp import WarpConfig, double_project
from dreamstereo.types import Direction, WarpMethod

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class WarpEvalConfig:
    """``dreamstereo warp-eval``: mask quality of every warp method on real stereo pairs."""

    warp: WarpConfig = dataclasses.field(default_factory=WarpConfig)  # delta / hole_margin for GAPW
    methods: list[WarpMethod] = dataclasses.field(default_factory=lambda: list(WarpMethod))

    def __post_init__(self):
        if not self.methods:
            raise ConfigError("methods must name at least one warp method")

MIDDLEBURY_DISPARITY_SCALE = 0.5  # disp*.png stores 2 x disparity in pixels (half-size images)
PAIR_FILES = ("view1.png", "view5.png", "disp1.png", "disp5.png")


@dataclasses.dataclass(frozen=True)
class StereoPairData:
    """A real stereo pair. Images ``(H, W, 3)`` float32 in [0, 1]; disparity ``(H, W)`` float32 px (0 = unknown)."""

    name: str
    left: np.ndarray
    right: np.ndarray
    disparity_left: np.ndarray
    disparity_right: np.ndarray


def find_pairs(root: str | Path) -> list[Path]:
    """Sub-folders of ``root`` that hold every file of a pair, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"warp-eval folder {str(root)!r} does not exist or is not a folder")
    pairs = sorted(p for p in root.iterdir() if p.is_dir() and all((p / f).is_file() for f in PAIR_FILES))
    if not pairs:
        raise FileNotFoundError(f"no stereo pair folders with {', '.join(PAIR_FILES)} under {str(root)!r}")
    return pairs


def load_pair(folder: str | Path) -> StereoPairData:
    """Read one pair folder (see module docstring)."""
    folder = Path(folder)
    left = media.read_image(folder / "view1.png")
    right = media.read_image(folder / "view5.png")
    d1 = media.read_disparity(folder / "disp1.png", scale=MIDDLEBURY_DISPARITY_SCALE)[0]
    d5 = media.read_disparity(folder / "disp5.png", scale=MIDDLEBURY_DISPARITY_SCALE)[0]
    return StereoPairData(folder.name, left, right, d1, d5)


def fill_from_background(disparity: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill unknown pixels of each row with the smaller (farther) of the nearest known values on each side.

    Args:
        disparity: ``(H, W)`` float px. known: ``(H, W)`` bool.
    Returns:
        ``(H, W)`` float32 with every pixel finite; a row with no known pixel becomes 0.
    """
    h, w = disparity.shape
    cols = np.broadcast_to(np.arange(w), (h, w))
    left_idx = np.maximum.accumulate(np.where(known, cols, -1), axis=1)  # nearest known on the left
    right_idx = np.minimum.accumulate(np.where(known, cols, w)[:, ::-1], axis=1)[:, ::-1]
    rows = np.arange(h)[:, None]
    big = np.float32(np.inf)
    left_val = np.where(left_idx >= 0, disparity[rows, left_idx.clip(0, w - 1)], big)
    right_val = np.where(right_idx < w, disparity[rows, right_idx.clip(0, w - 1)], big)
    filled = np.where(known, disparity, np.minimum(left_val, right_val))
    return np.where(np.isfinite(filled), filled, 0.0).astype(np.float32)


def occlusion_from_lr_check(disparity_left: np.ndarray, disparity_right: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: left-view pixels not visible in the right view (SOURCES.md rule)."""
    h, w = disparity_left.shape
    target = np.arange(w)[None, :] - disparity_left  # column in the right view
    off = target < 0
    col = np.clip(np.round(target), 0, w - 1).astype(np.int64)
    seen = disparity_right[np.arange(h)[:, None], col]
    return off | (np.abs(disparity_left - seen) > 1.0)


def evaluate_pair(pair: StereoPairData, methods=tuple(WarpMethod), **warp_options) -> list[dict]:
    """One row per method: mask scores of ``mask1`` against the LR-check occlusion, fly-points, PSNRs."""
    known = pair.disparity_left > 0
    disparity = fill_from_background(pair.disparity_left, known)
    occluded = occlusion_from_lr_check(pair.disparity_left, pair.disparity_right)
    frames = torch.from_numpy(pair.left).permute(2, 0, 1)[None].contiguous()  # (1, 3, H, W)
    disp = torch.from_numpy(disparity)[None]  # (1, H, W)
    right = torch.from_numpy(pair.right).permute(2, 0, 1)[None]
    # Right-view pixels whose ground truth is known and visible from the left view.
    right_visible = torch.from_numpy(
        (pair.disparity_right > 0) & ~_right_occlusion(pair.disparity_left, pair.disparity_right)
    )[None]
    rows = []
    for method in methods:
        method = WarpMethod(method)
        result = double_project(frames, disp, Direction.RIGHT, method=method, **warp_options)
        scores = metrics.mask_scores(result.mask1[0], occluded)
        rows.append({
            "pair": pair.name,
            "method": method.value,
            "recall": scores.recall,
            "precision": scores.precision,
            "iou": scores.iou,
            "fly_points": metrics.count_fly_points(result.mask1[0]),
            "roundtrip_psnr": metrics.psnr(result.view1, frames, ~result.mask1),
            "view2_psnr": metrics.psnr(result.view2, right, right_visible & ~result.mask2),
        })
    return rows


def _right_occlusion(disparity_left: np.ndarray, disparity_right: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: right-view pixels not visible in the left view (mirror of the LR check)."""
    mirrored = occlusion_from_lr_check(disparity_right[:, ::-1], disparity_left[:, ::-1])
    return mirrored[:, ::-1]


def evaluate_folder(root: str | Path, methods=tuple(WarpMethod), **warp_options) -> list[dict]:
    """Evaluate every pair folder under ``root``; see :func:`evaluate_pair`."""
    rows = []
    for folder in find_pairs(root):
        logger.info("warp-eval: %s", folder.name)
        rows.extend(evaluate_pair(load_pair(folder), methods, **warp_options))
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`evaluate_folder` rows."""
    head = f"{'pair':<10} {'method':<14} {'recall':>7} {'precision':>9} {'IoU':>7} {'fly-pts':>7} " \
           f"{'RT PSNR':>8} {'V2 PSNR':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['pair']:<10} {r['method']:<14} {r['recall']:7.4f} {r['precision']:9.4f} {r['iou']:7.4f} "
            f"{r['fly_points']:7d} {r['roundtrip_psnr']:8.2f} {r['view2_psnr']:8.2f}"
        )
    return "\n".join(lines)
