"""Synthetic stereo scenes whose warp answers are known analytically.

A scene is a stack of textured rectangular layers (fronto-parallel or slanted along x) over an
unbounded background; layers move horizontally and the camera pans. Everything is defined in
continuous coordinates (pixel centres at integers), so the ground truth below comes from the layer
geometry, never from running a warper:

* ``holes[direction]``: pixels of view 2 that see no surface visible in view 1 (disocclusions and
  frame borders);
* ``occluded[direction]``: pixels of view 1 that view 2 cannot see (the true ``mask1`` of a double
  projection).

A layer edge placed on a pixel boundary (``k + 0.5``) and moved by whole pixels is rasterised exactly,
so a warper that is right must match these masks to the pixel there.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from dreamstereo.io import media
from dreamstereo.io.sidecar import sidecar_of
from dreamstereo.types import Direction


@dataclasses.dataclass(frozen=True)
class Layer:
    """One planar, textured layer. Extents are in view-1 pixels at frame 0 (pixel centres at integers)."""

    disparity: float  # px at the layer's reference column (its centre; 0 for the background)
    slope: float = 0.0  # d(disparity)/dx, px per px; |slope| < 1 keeps the plane free of folds
    x0: float = -math.inf  # left edge (inclusive), px
    x1: float = math.inf  # right edge (exclusive), px
    y0: float = -math.inf  # top edge (inclusive), px
    y1: float = math.inf  # bottom edge (exclusive), px
    velocity: float = 0.0  # horizontal motion in px per frame, on top of the camera pan
    seed: int = 0  # texture seed

    @property
    def reference_x(self) -> float:
        """Layer-local column at which ``disparity`` holds (centre of a bounded layer)."""
        return 0.0 if math.isinf(self.x0) or math.isinf(self.x1) else 0.5 * (self.x0 + self.x1)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A rendered scene with its analytic masks.

    Attributes:
        frames: ``(T, H, W, 3)`` float32 in [0, 1], view 1.
        disparity: ``(T, H, W)`` float32, pixels of view 1, larger = nearer.
        holes: per direction, ``(T, H, W)`` bool holes of view 2.
        occluded: per direction, ``(T, H, W)`` bool pixels of view 1 hidden in view 2.
        layers: the layers it was made of; ``pan`` the camera pan in px per frame.
    """

    frames: np.ndarray
    disparity: np.ndarray
    holes: dict[Direction, np.ndarray]
    occluded: dict[Direction, np.ndarray]
    layers: tuple[Layer, ...]
    pan: float

    def tensors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(frames (T, 3, H, W), disparity (T, H, W))`` as torch tensors of ``dtype``."""
        frames = torch.from_numpy(self.frames).permute(0, 3, 1, 2).to(dtype).contiguous()
        return frames, torch.from_numpy(self.disparity).to(dtype)

    def frames_uint8(self) -> np.ndarray:
        """``(T, H, W, 3)`` uint8 frames, the layout of files and batches."""
        return np.round(self.frames * 255.0).astype(np.uint8)


def _texture(u: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Texture in layer coordinates ``(u, y)`` -> ``(..., 3)`` in [0.02, 0.98]: a base colour of its own
    per layer (so layers are told apart), smooth waves and a checker (so warps have edges to get right)."""
    rng = np.random.default_rng(seed)
    out = np.empty(u.shape + (3,), dtype=np.float64)
    base = rng.uniform(0.25, 0.75, size=3)
    for c in range(3):
        value = np.full(u.shape, base[c])
        for _ in range(3):
            fx, fy = rng.uniform(0.03, 0.25), rng.uniform(0.02, 0.2)
            value = value + 0.06 * np.sin(fx * u + fy * y + rng.uniform(0, 2 * np.pi))
        out[..., c] = value
    cell = rng.uniform(8, 16)
    checker = np.sign(np.sin(np.pi * u / cell) * np.sin(np.pi * y / cell))
    out += 0.08 * checker[..., None]
    return np.clip(out, 0.02, 0.98)


class _Geometry:
    """Per-frame layer placement; every method is vectorised over numpy arrays."""

    def __init__(self, layer: Layer, shift: float):
        self.layer, self.shift = layer, shift

    def covers(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether view-1 position ``(x, y)`` lies on the layer."""
        lay = self.layer
        return (x >= lay.x0 + self.shift) & (x < lay.x1 + self.shift) & (y >= lay.y0) & (y < lay.y1)

    def disparity(self, x: np.ndarray) -> np.ndarray:
        """Disparity in px of the layer's plane at view-1 column ``x``."""
        lay = self.layer
        return lay.disparity + lay.slope * (x - self.shift - lay.reference_x)

    def inverse(self, target: np.ndarray, sign: int) -> np.ndarray:
        """View-1 column ``x`` of the plane that lands on view-2 column ``target`` (``x + s d(x) = target``)."""
        lay = self.layer
        offset = lay.disparity - lay.slope * (self.shift + lay.reference_x)  # d(x) = offset + slope * x
        return (target - sign * offset) / (1.0 + sign * lay.slope)


def render(layers: list[Layer] | tuple[Layer, ...], *, width: int, height: int, num_frames: int,
           pan: float = 0.0) -> Scene:
    """Rasterise ``layers`` (the first must be an unbounded background) and derive the analytic masks.

    Args:
        layers: layers of the scene; overlapping layers are ordered by disparity per pixel.
        width, height, num_frames: output size.
        pan: camera pan in px per frame (every layer shifts by it).

    Returns:
        Scene with frames, disparity and the masks for both directions.
    """
    layers = tuple(layers)
    first = layers[0] if layers else None
    if first is None or not all(math.isinf(v) for v in (first.x0, first.x1, first.y0, first.y1)):
        raise ValueError("`layers[0]` must be an unbounded background layer (default extents)")
    for lay in layers:
        if abs(lay.slope) >= 1.0:
            raise ValueError(f"layer slope must satisfy |slope| < 1 (no folds), got {lay.slope}")
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = np.zeros((num_frames, height, width, 3), np.float32)
    disparity = np.zeros((num_frames, height, width), np.float32)
    holes = {d: np.zeros((num_frames, height, width), bool) for d in Direction}
    occluded = {d: np.zeros((num_frames, height, width), bool) for d in Direction}
    for t in range(num_frames):
        geos = [_Geometry(lay, (lay.velocity + pan) * t) for lay in layers]
        front_disp, front_layer = _front(geos, xs, ys)
        disparity[t] = front_disp
        for k, geo in enumerate(geos):
            sel = front_layer == k
            frames[t][sel] = _texture(xs[sel] - geo.shift, ys[sel], geo.layer.seed)
        for direction in Direction:
            holes[direction][t] = _holes(geos, xs, ys, direction.sign, width)
            occluded[direction][t] = _occluded(geos, xs, ys, front_disp, direction.sign, width)
    return Scene(frames, disparity, holes, occluded, layers, pan)


def _front(geos: list[_Geometry], xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest disparity over the layers covering each view-1 position, and which layer it is."""
    best = np.full(xs.shape, -np.inf)
    which = np.zeros(xs.shape, np.int64)
    for k, geo in enumerate(geos):
        d = np.where(geo.covers(xs, ys), geo.disparity(xs), -np.inf)
        closer = d > best
        best = np.where(closer, d, best)
        which = np.where(closer, k, which)
    return best, which


def _holes(geos, xs, ys, sign: int, width: int) -> np.ndarray:
    """View-2 pixels whose nearest surface is not visible in view 1 (or lies off the frame)."""
    best = np.full(xs.shape, -np.inf)
    source = np.zeros(xs.shape)
    for geo in geos:
        x_src = geo.inverse(xs, sign)  # view-1 column of this plane seen at view-2 column xs
        d = np.where(geo.covers(x_src, ys), geo.disparity(x_src), -np.inf)
        closer = d > best
        best, source = np.where(closer, d, best), np.where(closer, x_src, source)
    seen_disp, _ = _front(geos, source, ys)  # what view 1 shows at that source position
    off_frame = (source < 0) | (source > width - 1)  # pixel-centre convention, as the LR check
    return off_frame | (seen_disp > best + 1e-6)


def _occluded(geos, xs, ys, front_disp, sign: int, width: int) -> np.ndarray:
    """View-1 pixels that a nearer surface hides in view 2, or that land off the frame."""
    target = xs + sign * front_disp  # where each view-1 pixel lands in view 2
    hidden = (target < 0) | (target > width - 1)
    for geo in geos:
        x_src = geo.inverse(target, sign)
        d = np.where(geo.covers(x_src, ys), geo.disparity(x_src), -np.inf)
        hidden |= d > front_disp + 1e-6
    return hidden


def step_scene(*, width: int = 64, height: int = 8, d_back: float = 2.0, d_front: float = 10.0,
               edge: float = 31.5, front_on_left: bool = True, num_frames: int = 1) -> Scene:
    """Two fronto-parallel planes split by a vertical edge on a pixel boundary."""
    front = Layer(disparity=d_front, x0=-1e9 if front_on_left else edge, x1=edge if front_on_left else 1e9,
                  seed=2)
    return render([Layer(disparity=d_back, seed=1), front], width=width, height=height,
                  num_frames=num_frames)


def demo_scene(*, width: int = 256, height: int = 160, num_frames: int = 9, seed: int = 0) -> Scene:
    """A moving three-layer scene: slanted background, a slanted middle board, a moving near object.

    Edges sit on pixel boundaries and move by whole pixels, so the analytic masks are exact. Every depth
    edge is a step of at least 8 px.
    """
    rng = np.random.default_rng(seed)
    mid_x0 = float(np.floor(width * rng.uniform(0.15, 0.3))) + 0.5
    near_x0 = float(np.floor(width * rng.uniform(0.5, 0.6))) + 0.5
    layers = [
        Layer(disparity=3.0, slope=0.02, seed=seed * 10 + 1),  # background, slightly slanted
        Layer(disparity=16.0, slope=-0.03, x0=mid_x0, x1=mid_x0 + round(width * 0.3), y0=height * 0.1 - 0.5,
              y1=height * 0.8 + 0.5, seed=seed * 10 + 2),  # slanted board
        Layer(disparity=30.0, x0=near_x0, x1=near_x0 + round(width * 0.18), y0=height * 0.35 + 0.5,
              y1=height * 0.95 + 0.5, velocity=-2.0, seed=seed * 10 + 3),  # near object moving left
    ]
    return render(layers, width=width, height=height, num_frames=num_frames, pan=1.0)


def write_scene(scene: Scene, path, *, fps: float = 12.0) -> tuple[str, str]:
    """Write ``scene`` as an H.264 mp4 plus its disparity sidecar ``<stem>.disparity.npz``.

    The sidecar holds one array ``disparity``, ``(T, H, W)`` float32, the format the oracle depth
    backend reads. Returns the two paths.
    """
    path = Path(path)
    media.write_video(path, scene.frames_uint8(), fps)
    sidecar = Path(sidecar_of(str(path)))
    with media.atomic_path(sidecar) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, disparity=scene.disparity.astype(np.float32))
    return str(path), str(sidecar)
