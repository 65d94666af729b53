"""GAPW: gradient-aware backward warping with a Jacobian hole mask, and PBDP double projection.

Reference: "DreamStereo" (CVPR 2026), GAPW and PBDP; ../shared/docs/mission.md.

For rectified stereo a view-1 pixel at ``x`` appears in view 2 at ``f(x) = x + s * d(x)`` on the same
row (``s = -1`` when view 2 lies to the right). Between pixel centres ``f`` is taken as piecewise
linear. Backward warping inverts it per row: every target pixel ``j`` of view 2 finds the source
position ``x`` with ``f(x) = j`` and samples view 1 there with linear interpolation.

Inverse (right direction; the left direction is its mirror image). Where several sources land on one
target the nearest surface (largest disparity) wins. For ``s = -1`` a source ``y`` that lands on the
same target as ``x`` has ``y - x = d(y) - d(x)``, so every occluder of ``x`` lies to its right: ``x`` is
visible exactly when ``f(x) < f(y)`` for all ``y > x``. The visible part of the row is therefore the
non-decreasing suffix minimum ``g(x) = min_{y >= x} f(y)``; occluded sources and folds (``f' <= 0``)
sit on its flat parts and are never selected. Inverting ``g`` is a count: the segment ``[i, i + 1]``
that covers ``j`` is the last ``i`` with ``g(i) <= j``, read off a cumulative histogram of
``ceil(g)``. It is exact for the piecewise linear map, linear in the row length, uses integer
additions only (so no floating-point atomics and no run-to-run differences) and runs on any device.

Hole mask from the Jacobian. A segment whose mapped length ``L = f(i + 1) - f(i)`` exceeds ``delta``
is a source step stretched across a disocclusion. Each of its two end pixels keeps a sliver of its
footprint (``hole_margin``, default 0.25 px) and the targets in between are holes. With a step edge
from ``d_front`` to ``d_back`` this yields a band of exactly ``d_front - d_back`` pixels, the analytic
answer for an edge on the pixel boundary (tests/stages/test_gapw.py). Targets that no source covers
(beyond the first or last landing point of the row, the pixel-centre convention of the left-right
check) are border holes and show the edge pixel. Disocclusion holes are filled with the
background-side source (the end of the step with the smaller disparity), so the disparity of view 2
stays a sensible input to the return warp. A stretched step is part of the continuous map: it hides
what lands behind it (docs/method.md discusses thin near objects).

The public entry points (one call for every warper, PBDP, ``WarpConfig``) are in ``stages/warp.py``.
"""

from __future__ import annotations

import logging
import math

import torch

from dreamstereo.stages.warp_args import as_direction, check_warp_inputs
from dreamstereo.types import Direction, WarpResult

logger = logging.getLogger(__name__)

# Defaults chosen on Middlebury 2005/2006 (docs/benchmarks.md, "GAPW hole rule"): against (1.5, 0.5)
# they raise recall by up to 1 point and cut fly-points by half or more at equal or better IoU.
DEFAULT_DELTA = 2.0  # stretch (target px per source px) above which a step is a hole
DEFAULT_HOLE_MARGIN = 0.25  # px of a stretched step still shown by each end pixel
_CHUNK_PIXELS = 1 << 16  # pixels per block on CPU; see _row_chunks


def check_hole_rule(delta: float, hole_margin: float) -> None:
    """Validate the hole rule of :func:`gapw_warp`; raise ValueError naming the bad argument."""
    if not delta >= 1.0:
        raise ValueError(f"`delta` must be >= 1 (a step of one source pixel maps to >= 1 px), got {delta}")
    if not 0.0 <= hole_margin < delta / 2:
        raise ValueError(f"`hole_margin` must be in [0, delta / 2), got {hole_margin} with delta={delta}")


def _locate_right(
    disparity: torch.Tensor,
    delta: float,
    hole_margin: float,
    source_valid: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """Inverse map of ``x -> x - d`` for a block of rows; see the module docstring.

    Args:
        disparity: ``(T, H, W)`` float, pixels. source_valid: ``(T, H, W)`` bool or None.

    Returns:
        ``src_a, src_b`` ``(T, H, W)`` long source columns and ``frac`` ``(T, H, W)`` float: target
        ``j`` shows ``lerp(src[src_a], src[src_b], frac)``; ``hole`` (disocclusion) and ``border``
        ``(T, H, W)`` bool.
    """
    t, h, w = disparity.shape
    cols = torch.arange(w, device=disparity.device, dtype=disparity.dtype)  # (W,) source/target columns
    target = cols  # (W,) target column j, broadcast over (T, H, W)

    # 1. Where every source pixel lands, and the visible (suffix-minimum) envelope of that map.
    #    Invalid sources do not exist: they land nowhere (+inf), so they neither show nor occlude.
    landing = cols - disparity  # (T, H, W) f(x) = x - d(x)
    if source_valid is not None:
        landing.masked_fill_(~source_valid, math.inf)
    envelope = landing.flip(-1).cummin(-1).values.flip(-1)  # (T, H, W) g(x) = min_{y >= x} f(y)

    # 2. Segment [i, i + 1] covering each target: the last i with g(i) <= j. For integer j,
    #    g(i) <= j  <=>  ceil(g(i)) <= j, so count(j) = #{i : g(i) <= j} is a cumulative histogram of
    #    ceil(g) (bin W collects everything right of the frame): linear time, integer adds only.
    first_target = envelope.ceil().clamp_(0, w).long()  # (T, H, W) first target at or right of g(i)
    hist = torch.zeros(t, h, w + 1, dtype=torch.long, device=disparity.device)
    hist.scatter_add_(-1, first_target, torch.ones_like(first_target))
    count = hist.cumsum_(-1)[..., :w]  # (T, H, W) #{i : g(i) <= j}
    seg = (count - 1).clamp_(0, w - 2)  # (T, H, W) left end i of the segment
    if source_valid is None:
        seg_next = seg + 1
    else:  # the segment bridges a run of invalid sources to the next valid one (i itself is valid)
        valid_col = torch.arange(w, device=disparity.device).expand(t, h, w).masked_fill(~source_valid, w)
        next_valid = valid_col.flip(-1).cummin(-1).values.flip(-1)  # (T, H, W) first valid column >= x
        seg_next = next_valid.gather(-1, seg + 1)
        seg_next = torch.where(seg_next == w, seg, seg_next)  # none right of i: j is past the last one
    f_a = landing.gather(-1, seg)  # (T, H, W) f(i)
    f_b = landing.gather(-1, seg_next)  # (T, H, W) f(i + 1)
    length = f_b - f_a  # (T, H, W) mapped length of the step, > 0 wherever the segment is selected
    into = target - f_a  # distance of j from the segment's start, in target pixels
    frac = (into / length.clamp(min=1e-12)).clamp_(0.0, 1.0)  # position on the segment: 0 = i, 1 = i + 1

    # 3. Jacobian mask: a stretched step keeps hole_margin px of footprint at each end; between is a hole.
    #    For x -> x - d a step between neighbours stretches only where d falls (L = 1 + d(i) - d(i+1)
    #    > delta >= 1), so its background end is i + 1: holes and the far footprint take the far end,
    #    the near footprint i (a step bridging invalid sources keeps the same rule).
    stretched = length > delta
    past_start = into > hole_margin
    hole = stretched & past_start & ((f_b - target) > hole_margin)
    frac = torch.where(stretched, past_start.to(frac.dtype), frac)

    # 4. Frame borders: targets left of every landing point, or right of the last one, have no source
    #    (pixel-centre convention, as the left-right check of real data). They show the edge pixel.
    before = count == 0
    frac.masked_fill_(before, 0.0).masked_fill_(count == w, 1.0)  # count == w: j >= f(W-1), source W-1
    border = before | (target > f_b)  # inside the row j < g(i + 1) <= f_b, so only past the last landing
    return seg, seg_next, frac, hole, border


def _row_chunks(t: int, h: int, w: int, device: torch.device):
    """``(frame, row slice)`` blocks of about ``_CHUNK_PIXELS`` pixels on CPU (cache-sized: several times
    faster than whole batches, benchmarks/bench_warp.py), or the whole batch at once on accelerators."""
    if device.type != "cpu":
        yield slice(None), slice(None)
        return
    rows = max(1, _CHUNK_PIXELS // w)
    for f in range(t):
        for r in range(0, h, rows):
            yield slice(f, f + 1), slice(r, r + rows)


def gapw_warp(
    frames: torch.Tensor,
    disparity: torch.Tensor,
    direction: Direction | str = Direction.RIGHT,
    *,
    delta: float = DEFAULT_DELTA,
    hole_margin: float = DEFAULT_HOLE_MARGIN,
    source_valid: torch.Tensor | None = None,
) -> WarpResult:
    """Warp view 1 to view 2 by gradient-aware backward warping.

    Args:
        frames: ``(T, 3, H, W)`` float32/float64 in [0, 1], view 1.
        disparity: ``(T, H, W)`` float32/float64, pixels of view 1, larger = nearer, any sign.
        direction: ``"right"`` (view 2 to the right, ``x -> x - d``) or ``"left"`` (``x -> x + d``).
        delta: a source step mapped longer than ``delta`` target pixels is stretched across a hole.
        hole_margin: half-width of a pixel's footprint in target pixels: targets of a stretched step
            within it of either end still show that end pixel; 0 marks the whole step as hole.
        source_valid: optional ``(T, H, W)`` bool; invalid source pixels are treated as absent (they
            neither show nor occlude; segments bridge them), as the holes of view 2 in the return warp.

    Returns:
        WarpResult ``(view, disparity, mask)``: view 2 ``(T, 3, H, W)`` in the dtype of ``frames``;
        disparity of view 2 ``(T, H, W)`` in pixels; hole mask ``(T, H, W)`` bool.

    Raises:
        ValueError: on bad shapes, dtypes, empty tensors, non-finite disparity or a bad direction.
    """
    view, disparity2, disocclusion, border = gapw_parts(frames, disparity, direction, delta, hole_margin, source_valid)
    return WarpResult(view, disparity2, disocclusion | border)


@torch.no_grad()
def gapw_parts(frames, disparity, direction, delta, hole_margin, source_valid):
    """:func:`gapw_warp` with the disocclusion and border parts of the mask kept apart.

    Not differentiable: the source of each target is an integer choice (data generation and masks
    need no gradients), so it runs without autograd whatever its inputs require.
    """
    direction = as_direction(direction)
    check_warp_inputs(frames, disparity, source_valid)
    check_hole_rule(delta, hole_margin)
    disparity = disparity.to(frames.dtype)
    t, c, h, w = frames.shape
    view = torch.empty_like(frames)
    disparity2 = torch.empty_like(disparity)
    disocclusion = torch.empty(disparity.shape, dtype=torch.bool, device=frames.device)
    border = torch.empty_like(disocclusion)
    for f, r in _row_chunks(t, h, w, frames.device):
        disp = disparity[f, r]
        valid = None if source_valid is None else source_valid[f, r]
        if direction is Direction.RIGHT:
            src_a, src_b, frac, hole, edge = _locate_right(disp, delta, hole_margin, valid)
        else:
            # The left warp is the right warp of the mirrored row (u = W-1-x maps x -> x + d to
            # u -> u - d). Only the one-channel index maps are mirrored, never the frames.
            located = _locate_right(disp.flip(-1), delta, hole_margin, None if valid is None else valid.flip(-1))
            src_a, src_b = ((w - 1 - x).flip(-1) for x in located[:2])
            frac, hole, edge = (x.flip(-1) for x in located[2:])
        disocclusion[f, r], border[f, r] = hole, edge
        torch.lerp(disp.gather(-1, src_a), disp.gather(-1, src_b), frac, out=disparity2[f, r])
        for ch in range(c):  # one channel at a time with a contiguous index: about 2x faster than 3-D
            plane = frames[f, ch, r]
            torch.lerp(plane.gather(-1, src_a), plane.gather(-1, src_b), frac, out=view[f, ch, r])
    return view, disparity2, disocclusion, border
