"""Forward-splat baselines for ablations and comparison with GAPW.

* ``soft_splat_warp``: a depth-weighted bilinear splat as StereoCrafter's ``ForwardWarpStereo`` does it
  (TencentARC/StereoCrafter ``depth_splatting_inference.py``): every source pixel is splatted to the two
  target pixels around ``x + s * d`` with bilinear weights times ``1.414 ** (d - d_min)``, colours are
  the weighted average, and a target is a hole where the splatted coverage of ones is below 0.5.
* ``zbuffer_splat_warp``: a hard nearest-surface point splat as iw3 does it: every source pixel goes to
  the nearest target pixel, the largest disparity wins, and targets that nothing reaches are holes.

Both use scatter operations: on CUDA the soft splat's float scatter-add is not bitwise deterministic;
GAPW (``gapw.py``) has no such race. Same arguments and result as :func:`dreamstereo.stages.gapw.gapw_warp`.
"""

from __future__ import annotations

import torch

from dreamstereo.stages.warp_args import as_direction, check_warp_inputs
from dreamstereo.types import Direction, WarpResult

SOFT_SPLAT_WEIGHT_BASE = 1.414  # StereoCrafter's depth weight base: w = 1.414 ** (d - d_min)
SOFT_SPLAT_COVERAGE = 0.5  # a target with splatted coverage below this is a hole (issue 2)
_FLOAT32_EXPONENT = 200.0  # disparity range (px) up to which weights are summed in float32
_MAX_WEIGHT_EXPONENT = 1900.0  # 1.414 ** 1900 ~ 1e286 in float64: depth order exact up to 1900 px


def _landing(disparity: torch.Tensor, direction: Direction) -> torch.Tensor:
    """``(T, H, W)`` float target column of every source pixel: ``x + s * d``."""
    cols = torch.arange(disparity.shape[-1], device=disparity.device, dtype=disparity.dtype)
    return cols + direction.sign * disparity


def _prepare(frames, disparity, direction, source_valid) -> tuple[Direction, torch.Tensor]:
    """Validate a splat's arguments; return the parsed direction and the disparity in the frames' dtype."""
    direction = as_direction(direction)
    check_warp_inputs(frames, disparity, source_valid)
    return direction, disparity.to(frames.dtype)


def _flat_index(columns: torch.Tensor, width: int) -> torch.Tensor:
    """Row-major index ``y * W + x`` of target columns ``(T, H, W)``; out-of-frame -> dump slot ``H * W``."""
    t, h, w = columns.shape
    inside = (columns >= 0) & (columns < width)
    rows = torch.arange(h, device=columns.device).view(1, h, 1) * width  # (1, H, 1)
    index = torch.where(inside, rows + columns, h * width)  # (T, H, W)
    return index.reshape(t, h * w)


def soft_splat_warp(
    frames: torch.Tensor,
    disparity: torch.Tensor,
    direction: Direction | str = Direction.RIGHT,
    *,
    source_valid: torch.Tensor | None = None,
) -> WarpResult:
    """StereoCrafter-style soft splat; see the module docstring. Returns ``(view, disparity, mask)``."""
    direction, disparity = _prepare(frames, disparity, direction, source_valid)
    t, c, h, w = frames.shape
    landing = _landing(disparity, direction)  # (T, H, W)
    left = landing.floor()
    frac = landing - left  # bilinear weight of the right neighbour
    left = left.long()

    # Weights grow by 1.414 per pixel of disparity: a range beyond 200 px would overflow float32
    # (1.414 ** 256 ~ 3e38), so such inputs accumulate in float64 and keep their depth order.
    d_min = disparity.amin(dim=(1, 2), keepdim=True)  # (T, 1, 1)
    exponent = disparity - d_min
    acc = torch.float64 if float(exponent.max()) > _FLOAT32_EXPONENT else frames.dtype
    depth_weight = torch.pow(SOFT_SPLAT_WEIGHT_BASE, exponent.to(acc).clamp(max=_MAX_WEIGHT_EXPONENT))
    coverage_weight = torch.ones_like(disparity)
    if source_valid is not None:
        depth_weight = depth_weight * source_valid
        coverage_weight = coverage_weight * source_valid

    values = torch.cat([frames, disparity.unsqueeze(1)], dim=1).reshape(t, c + 1, h * w).to(acc)  # (T, C+1, H*W)
    numer = values.new_zeros(t, c + 1, h * w + 1)
    denom = values.new_zeros(t, h * w + 1)
    cover = frames.new_zeros(t, h * w + 1)
    for offset, bilinear in ((0, 1.0 - frac), (1, frac)):
        index = _flat_index(left + offset, w)  # (T, H*W)
        weight = (depth_weight * bilinear.to(acc)).reshape(t, h * w)
        numer.scatter_add_(2, index.unsqueeze(1).expand(-1, c + 1, -1), values * weight.unsqueeze(1))
        denom.scatter_add_(1, index, weight)
        cover.scatter_add_(1, index, (coverage_weight * bilinear).reshape(t, h * w))

    tiny = torch.finfo(acc).tiny
    splatted = (numer[..., :-1] / denom[:, None, :-1].clamp(min=tiny)).view(t, c + 1, h, w).to(frames.dtype)
    hole = (cover[:, :-1] < SOFT_SPLAT_COVERAGE).view(t, h, w)
    return WarpResult(splatted[:, :c].clamp(0.0, 1.0), splatted[:, c], hole)


def zbuffer_splat_warp(
    frames: torch.Tensor,
    disparity: torch.Tensor,
    direction: Direction | str = Direction.RIGHT,
    *,
    source_valid: torch.Tensor | None = None,
) -> WarpResult:
    """iw3-style hard z-buffer point splat; see the module docstring. Returns ``(view, disparity, mask)``."""
    direction, disparity = _prepare(frames, disparity, direction, source_valid)
    t, c, h, w = frames.shape
    landing = _landing(disparity, direction).round().long()  # (T, H, W) nearest target column
    index = _flat_index(landing, w)  # (T, H*W)
    if source_valid is not None:
        index = torch.where(source_valid.reshape(t, h * w), index, h * w)
    flat_disp = disparity.reshape(t, h * w)

    # 1. Nearest surface per target: the largest disparity that lands there.
    front = flat_disp.new_full((t, h * w + 1), float("-inf"))
    front.scatter_reduce_(1, index, flat_disp, reduce="amax")
    # 2. Among the sources at that depth, the rightmost column wins (a fixed, order-free tie-break).
    is_front = flat_disp == front.gather(1, index)
    source_col = torch.arange(w, device=frames.device).expand(t, h, w).reshape(t, h * w)
    winner = torch.full((t, h * w + 1), -1, dtype=torch.long, device=frames.device)
    winner.scatter_reduce_(1, index, torch.where(is_front, source_col, -1), reduce="amax")
    winner = winner[:, :-1].view(t, h, w)  # (T, H, W) source column, -1 = hole

    hole = winner < 0
    col = winner.clamp(min=0)
    view = frames.gather(-1, col.unsqueeze(1).expand(-1, c, -1, -1))  # (T, C, H, W)
    disparity2 = torch.where(hole, 0.0, front[:, :-1].view(t, h, w))
    view = torch.where(hole.unsqueeze(1), 0.0, view)
    return WarpResult(view, disparity2.to(frames.dtype), hole)
