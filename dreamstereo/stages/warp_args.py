"""Argument parsing and checks shared by every warper (GAPW in ``gapw.py``, the splats in ``splat.py``)."""

from __future__ import annotations

import enum
from typing import TypeVar

import torch

from dreamstereo.types import Direction, WarpMethod

E = TypeVar("E", bound=enum.Enum)

_FLOAT_DTYPES = (torch.float32, torch.float64)


def parse_enum(cls: type[E], value: E | str, name: str) -> E:
    """``value`` as a member of the string enum ``cls``; a ValueError naming ``name`` and the allowed values."""
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"`{name}={value!r}` must be one of {[m.value for m in cls]}") from None


def as_direction(direction: Direction | str) -> Direction:
    """Parse ``direction`` ("right" / "left" or a :class:`Direction`); raise ValueError otherwise."""
    return parse_enum(Direction, direction, "direction")


def as_method(method: WarpMethod | str) -> WarpMethod:
    """Parse a warp method name; raise ValueError listing the allowed ones."""
    return parse_enum(WarpMethod, method, "method")


def check_warp_inputs(
    frames: torch.Tensor,
    disparity: torch.Tensor,
    source_valid: torch.Tensor | None = None,
) -> None:
    """Validate the arguments of a warp; raise ValueError naming the argument and the problem."""
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"`frames` must be a torch.Tensor, got {type(frames).__name__}")
    if not isinstance(disparity, torch.Tensor):
        raise ValueError(f"`disparity` must be a torch.Tensor, got {type(disparity).__name__}")
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"`frames` must have shape (T, 3, H, W), got {tuple(frames.shape)}")
    if disparity.ndim != 3:
        raise ValueError(f"`disparity` must have shape (T, H, W), got {tuple(disparity.shape)}")
    if frames.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"`frames` must be float32 or float64 in [0, 1], got dtype {frames.dtype}")
    if disparity.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"`disparity` must be float32 or float64 pixels, got dtype {disparity.dtype}")
    t, _, h, w = frames.shape
    if (t, h, w) != tuple(disparity.shape):
        raise ValueError(
            f"`disparity` shape {tuple(disparity.shape)} does not match `frames` (T, H, W) = {(t, h, w)}"
        )
    if t == 0 or h == 0 or w < 2:
        raise ValueError(f"`frames` is empty or too narrow: shape {tuple(frames.shape)} (need T, H >= 1, W >= 2)")
    if disparity.device != frames.device:
        raise ValueError(f"`disparity` is on {disparity.device} but `frames` on {frames.device}")
    if not bool(torch.isfinite(disparity.sum())) and not bool(torch.isfinite(disparity).all()):
        bad = int((~torch.isfinite(disparity)).sum())
        raise ValueError(f"`disparity` has {bad} NaN/inf values; fill or mask them before warping")
    if source_valid is not None:
        if source_valid.dtype != torch.bool or tuple(source_valid.shape) != (t, h, w):
            raise ValueError(
                f"`source_valid` must be a bool tensor of shape {(t, h, w)}, "
                f"got {source_valid.dtype} {tuple(source_valid.shape)}"
            )
