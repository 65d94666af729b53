"""One entry point for every warper: :func:`warp` (GAPW or a forward-splat baseline), :func:`double_project`
(PBDP), and :class:`WarpConfig`, the ``warp:`` section of every schema.

GAPW itself is ``gapw.py`` (the method and its proof of exactness, in PyTorch: the reference, and the path
on accelerators) and ``gapw_numba.py`` (the same rule as one compiled kernel, the default on CPU tensors;
``WarpConfig.kernel`` / the ``kernel`` argument choose), the baselines are ``splat.py``.

Why training pairs take the round trip through the view OPPOSITE to the synthesized eye: at inference
we synthesize a right view from a left one, and its holes lie on the right side of foreground objects.
The mask ``mask1`` of a round trip marks the view-1 pixels hidden in view 2; through a view on the
right those lie to the LEFT of foreground edges (mirrored), through a view on the left they lie to the
RIGHT, with the same sidedness as the inference holes. ``training_direction`` encodes that rule and
the pair generator uses it as its default.
"""

from __future__ import annotations

import dataclasses
import enum

import torch

from dreamstereo.stages import splat
from dreamstereo.stages.gapw import DEFAULT_DELTA, DEFAULT_HOLE_MARGIN, gapw_parts, gapw_warp
from dreamstereo.stages.warp_args import as_direction, as_method, check_warp_inputs, parse_enum  # noqa: F401 (public here)
from dreamstereo.types import Direction, DoubleProjection, WarpMethod, WarpResult


class WarpKernel(str, enum.Enum):
    """Which implementation runs GAPW: chosen by device, the PyTorch reference, or the compiled CPU kernel."""

    AUTO = "auto"  # numba on CPU tensors, torch on accelerators
    TORCH = "torch"  # gapw.py, any device: the reference
    NUMBA = "numba"  # gapw_numba.py, CPU tensors only (issue 12, docs/benchmarks.md: same answers, faster)


def as_kernel(kernel: WarpKernel | str) -> WarpKernel:
    """Parse a GAPW kernel name; raise ValueError listing the allowed ones."""
    return parse_enum(WarpKernel, kernel, "kernel")


def use_numba(kernel: WarpKernel | str, device: torch.device | str) -> bool:
    """Whether GAPW on tensors on ``device`` runs in the compiled kernel: ``auto`` on the CPU, or ``numba``.

    Raises:
        ValueError: for an unknown ``kernel``, or ``kernel="numba"`` on a device other than the CPU.
    """
    kernel = as_kernel(kernel)
    on_cpu = torch.device(device).type == "cpu"
    if kernel is WarpKernel.NUMBA and not on_cpu:
        raise ValueError(f"warp.kernel=numba runs on CPU tensors, but `frames` is on {device}; "
                         "use warp.kernel=auto or torch")
    return kernel is WarpKernel.NUMBA or (kernel is WarpKernel.AUTO and on_cpu)


def _device(frames) -> torch.device | str:
    """The device of ``frames``; "cpu" for anything else (the warp's own checks then name the problem)."""
    return frames.device if isinstance(frames, torch.Tensor) else "cpu"


def _numba():
    """The compiled kernels, imported on first use (importing numba takes about a second)."""
    from dreamstereo.stages import gapw_numba

    return gapw_numba


@dataclasses.dataclass
class WarpConfig:
    """How views are warped (GAPW or a forward-splat baseline)."""

    method: WarpMethod = WarpMethod.GAPW  # gapw | soft_splat | zbuffer_splat
    delta: float = DEFAULT_DELTA  # GAPW: a source step stretched beyond this many target px is a hole
    hole_margin: float = DEFAULT_HOLE_MARGIN  # GAPW: px of a stretched step still shown by each end pixel
    # GAPW implementation: auto (the compiled numba kernel on CPU, PyTorch elsewhere) | torch (the
    # PyTorch reference, any device) | numba (CPU only). Same masks and values (tests/stages/test_gapw_numba.py).
    kernel: WarpKernel = WarpKernel.AUTO

    def __post_init__(self):
        if self.delta < 1.0:
            raise ValueError(f"warp.delta must be >= 1, got {self.delta}")
        if not 0.0 <= self.hole_margin < self.delta / 2:
            raise ValueError(f"warp.hole_margin must be in [0, warp.delta / 2), got {self.hole_margin}")

    def options(self) -> dict:
        """Keyword arguments for :func:`double_project` / :func:`warp`."""
        return {"method": self.method, "delta": self.delta, "hole_margin": self.hole_margin, "kernel": self.kernel}


def training_direction(synthesized_eye: Direction | str = Direction.RIGHT) -> Direction:
    """Round-trip direction for training pairs: the view opposite to the eye inference synthesizes.

    See the module docstring: a round trip through the opposite view gives holes with the same
    sidedness as the holes of the synthesized eye.
    """
    return as_direction(synthesized_eye).opposite


def warp(
    frames: torch.Tensor,
    disparity: torch.Tensor,
    direction: Direction | str = Direction.RIGHT,
    *,
    method: WarpMethod | str = WarpMethod.GAPW,
    delta: float = DEFAULT_DELTA,
    hole_margin: float = DEFAULT_HOLE_MARGIN,
    source_valid: torch.Tensor | None = None,
    kernel: WarpKernel | str = WarpKernel.AUTO,
) -> WarpResult:
    """Warp with the chosen method (GAPW or a forward-splat baseline); same arguments as :func:`gapw_warp`.

    ``delta``, ``hole_margin`` and ``kernel`` (see :class:`WarpKernel`) only apply to GAPW; the splats
    have their own fixed rules.
    """
    method = as_method(method)
    if method is WarpMethod.GAPW:
        if use_numba(kernel, _device(frames)):
            view, disparity2, disocclusion, border = _numba().gapw_parts(
                frames, disparity, direction, delta, hole_margin, source_valid)
            return WarpResult(view, disparity2, disocclusion | border)
        return gapw_warp(
            frames, disparity, direction, delta=delta, hole_margin=hole_margin, source_valid=source_valid
        )
    if method is WarpMethod.SOFT_SPLAT:
        return splat.soft_splat_warp(frames, disparity, direction, source_valid=source_valid)
    return splat.zbuffer_splat_warp(frames, disparity, direction, source_valid=source_valid)


def double_project(
    frames: torch.Tensor,
    disparity: torch.Tensor,
    direction: Direction | str = Direction.RIGHT,
    *,
    method: WarpMethod | str = WarpMethod.GAPW,
    delta: float = DEFAULT_DELTA,
    hole_margin: float = DEFAULT_HOLE_MARGIN,
    kernel: WarpKernel | str = WarpKernel.AUTO,
) -> DoubleProjection:
    """PBDP: warp view 1 to view 2, then back to view 1 with the disparity of view 2.

    ``(V2, D2, M2) = warp(V1, D1, direction)`` and ``(V1', M1) = warp(V2, D2, opposite)``, where the
    return warp treats the holes of view 2 as invalid sources, so ``M1`` marks the pixels of view 1
    that view 2 cannot see. For training pairs pass ``training_direction(...)`` (the view opposite
    to the synthesized eye; module docstring).

    Args:
        frames: ``(T, 3, H, W)`` float32/float64 in [0, 1], view 1.
        disparity: ``(T, H, W)`` float, pixels of view 1, larger = nearer.
        direction: where view 2 lies, ``"right"`` or ``"left"``.
        method: ``"gapw"`` (default), ``"soft_splat"`` or ``"zbuffer_splat"``.
        delta, hole_margin: GAPW hole rule, see :func:`gapw_warp`.
        kernel: GAPW implementation, ``"auto"`` (compiled on CPU tensors), ``"torch"`` or ``"numba"``.

    Returns:
        DoubleProjection with ``view2, disparity2, mask2, view1, mask1``.
    """
    direction = as_direction(direction)
    opts = dict(method=method, delta=delta, hole_margin=hole_margin, kernel=kernel)
    if as_method(method) is WarpMethod.GAPW and use_numba(kernel, _device(frames)):
        # Both warps of a row in one pass of the compiled kernel, the same rule as below.
        view2, disparity2, mask2, view1, mask1 = _numba().double_project(frames, disparity, direction, delta,
                                                                          hole_margin)
        return DoubleProjection(view2=view2, disparity2=disparity2, mask2=mask2, view1=view1, mask1=mask1)
    if as_method(method) is WarpMethod.GAPW:
        # Border holes show the edge pixel, which is what view 2 would see there; only disocclusions
        # are invalid sources for the return warp (a view-1 pixel near the far border stays visible).
        view2, disparity2, disocclusion, border = gapw_parts(frames, disparity, direction, delta, hole_margin, None)
        mask2, invalid = disocclusion | border, disocclusion
    else:
        view2, disparity2, mask2 = warp(frames, disparity, direction, **opts)
        invalid = mask2
    view1, _, mask1 = warp(view2, disparity2, direction.opposite, source_valid=~invalid, **opts)
    return DoubleProjection(view2=view2, disparity2=disparity2, mask2=mask2, view1=view1, mask1=mask1)
