"""Training pairs: PBDP on a clip with its disparity in pixels (issue 3, built on stages/gapw.py).

A pair is ``(V1 clean, V1' round trip, M1, disparity)``. By default the round trip goes through the
view OPPOSITE to the eye that inference synthesizes (``training_direction``; docs/method.md), so the
training holes have the sidedness of the inference holes. An optional horizontal flip (decided from
the sample key) mirrors frames and disparity before the projection, which mirrors the hole sidedness
too; it is recorded with the sample.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dreamstereo.stages.disparity import rng_for
from dreamstereo.stages.warp import WarpConfig, double_project, training_direction, use_numba
from dreamstereo.types import Direction, WarpMethod


@dataclasses.dataclass
class PairConfig:
    """How a clip becomes a training pair."""

    synthesized_eye: Direction = Direction.RIGHT  # the eye inference makes; pairs go through the other view
    flip_probability: float = 0.0  # chance of a horizontal flip per clip (seeded from the sample key)
    warp: WarpConfig = dataclasses.field(default_factory=WarpConfig)

    def __post_init__(self):
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"pairs.flip_probability must be in [0, 1], got {self.flip_probability}")


@dataclasses.dataclass(frozen=True)
class TrainingPair:
    """One training sample's arrays.

    clean: ``(T, H, W, 3) uint8``, V1 (flipped if ``flipped``). warped: ``(T, H, W, 3) uint8``, V1' the
    round trip. mask: ``(T, H, W) bool``, M1 (True = hole to inpaint). disparity: ``(T, H, W) float32``
    pixels of V1. direction: where the round trip went.
    """

    clean: np.ndarray
    warped: np.ndarray
    mask: np.ndarray
    disparity: np.ndarray
    direction: Direction
    flipped: bool


@dataclasses.dataclass(frozen=True)
class PairPlan:
    """What is decided once per clip: the flip (seeded from the sample key) and the round trip's direction."""

    flipped: bool
    direction: Direction


def plan_pair(key: str, cfg: PairConfig) -> PairPlan:
    """The clip's flip (seeded from ``key``) and round-trip direction (from ``cfg.synthesized_eye``)."""
    return PairPlan(bool(rng_for(key, "flip").random() < cfg.flip_probability), training_direction(cfg.synthesized_eye))


def pair_frames(frames: np.ndarray, disparity_px: np.ndarray, plan: PairPlan, cfg: PairConfig, *,
                device: str | torch.device = "cpu") -> TrainingPair:
    """Double-project some frames of a clip (all of them, or a chunk: PBDP works frame by frame, so a clip
    paired chunk by chunk gives the same arrays as the whole clip at once).

    Args:
        frames: ``(T, H, W, 3) uint8``. disparity_px: ``(T, H, W)`` float pixels, larger = nearer.
        plan: the clip's :func:`plan_pair`. cfg: pair settings (the warp's options).
        device: where the projection runs, chosen by the caller (``resources.pair_placement``: the depth
            actor's device, or the CPU); the returned arrays are host numpy arrays either way.
    """
    if frames.shape[:3] != disparity_px.shape:
        raise ValueError(f"`disparity_px` shape {disparity_px.shape} does not match `frames` {frames.shape[:3]}")
    if plan.flipped:
        frames, disparity_px = frames[:, :, ::-1], disparity_px[:, :, ::-1]
    if WarpMethod(cfg.warp.method) is WarpMethod.GAPW and use_numba(cfg.warp.kernel, device):
        # The compiled kernel takes the uint8 frames as they are and returns the uint8 round trip: the same
        # answer as the float path below without its float32 copies. Imported here, as warp.py does, so that
        # importing this module does not import numba.
        from dreamstereo.stages.gapw_numba import pair_uint8

        clean = np.ascontiguousarray(frames)
        disparity = np.ascontiguousarray(disparity_px, dtype=np.float32)
        warped, mask = pair_uint8(clean, disparity, plan.direction, cfg.warp.delta, cfg.warp.hole_margin)
        return TrainingPair(clean=clean, warped=warped, mask=mask, disparity=disparity, direction=plan.direction,
                            flipped=plan.flipped)
    frames = np.ascontiguousarray(frames) if frames.flags.writeable else frames.copy()  # torch wants writable
    view = torch.from_numpy(frames).to(device)  # uint8 travels, float is made there
    view = view.permute(0, 3, 1, 2).float().div_(255.0)  # (T, H, W, 3) -> (T, 3, H, W)
    disparity = np.ascontiguousarray(disparity_px, dtype=np.float32)
    result = double_project(view, torch.from_numpy(disparity).to(device), plan.direction, **cfg.warp.options())
    del view
    warped = result.view1.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return TrainingPair(clean=np.ascontiguousarray(frames), warped=warped, mask=result.mask1.cpu().numpy(),
                        disparity=disparity, direction=plan.direction, flipped=plan.flipped)


def make_pair(frames: np.ndarray, disparity_px: np.ndarray, key: str, cfg: PairConfig, *,
              device: str | torch.device = "cpu") -> TrainingPair:
    """Double-project a whole clip into a training pair; the flip (if any) is seeded from ``key``.

    Args:
        frames: ``(T, H, W, 3) uint8`` clip. disparity_px: ``(T, H, W)`` float pixels, larger = nearer.
        key: the sample key (seeds the flip). cfg: pair settings.
        device: where the projection runs, chosen by the caller (``resources.pair_placement``: the depth
            actor's device, or the CPU); the returned arrays are host numpy arrays either way.
    """
    return pair_frames(frames, disparity_px, plan_pair(key, cfg), cfg, device=device)
