"""Depth backends: frames -> relative disparity ``(T, H, W)`` float32, larger = nearer.

One interface, ``backend(frames) -> disparity``, for every backend:

* ``oracle``: disparity given with the video (``<stem>.disparity.npz``); the caller reads the file and
  :func:`oracle_disparity` picks the clip's frames and applies the clip's resize and crop. For
  synthetic corpora and users who bring their own depth.
* ``depth-anything-v2``: Depth Anything V2 through transformers (``AutoModelForDepthEstimation``), per
  frame, then a per-clip scale/shift alignment so the disparity does not flicker.
* ``depthcrafter``: DepthCrafter's video depth diffusion from SVD components (``depthcrafter.py``),
  windowed over long clips, normalised per clip. The paper's choice.

Model weights come from a local folder or a hub id (``depth.weights``); nothing downloads in tests, and a
missing weight raises :class:`DepthWeightsError` saying how to provide it. A backend is a class: it
loads its model once in ``__init__`` (on the device its caller chose) and is called per clip.
"""

from __future__ import annotations

import dataclasses
import logging

import cv2
import numpy as np
import torch

from dreamstereo import toy_models
from dreamstereo.arrays import ArrayFile, ArrayFileError
from dreamstereo.stages.weights import DepthWeightsError, load_pretrained  # noqa: F401 (DepthWeightsError: public here)
from dreamstereo.types import DepthBackendName, ErrorCode, SampleError

logger = logging.getLogger(__name__)

STAGE = "depth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


DEFAULT_WEIGHTS = {DepthBackendName.DEPTH_ANYTHING_V2: "depth-anything/Depth-Anything-V2-Small-hf",
                   DepthBackendName.DEPTHCRAFTER: "tencent/DepthCrafter"}
SVD_BASE_WEIGHTS = "stabilityai/stable-video-diffusion-img2vid-xt"  # DepthCrafter's VAE, CLIP and scheduler


@dataclasses.dataclass
class DepthConfig:
    """Which depth backend runs, and its weights."""

    backend: DepthBackendName = DepthBackendName.DEPTH_ANYTHING_V2
    weights: str | None = None  # local folder, hub id, or toy (random weights: a smoke test); None = the default
    input_size: int = 518  # px, short side fed to Depth Anything V2 (a multiple of its 14 px patch)
    batch_size: int = 8  # frames per forward pass
    base_weights: str = SVD_BASE_WEIGHTS  # DepthCrafter: folder or hub id with vae/, image_encoder/, scheduler/
    steps: int = 5  # DepthCrafter denoising steps (5 = its fast mode)
    window: int = 110  # DepthCrafter frames per window
    overlap: int = 25  # DepthCrafter frames shared by consecutive windows, blended linearly
    max_resolution: int = 1024  # DepthCrafter long side in px (rounded to multiples of 64)
    noise_aug_strength: float = 0.02  # DepthCrafter: noise on the conditioning video and its time id
    fp16: bool = False  # DepthCrafter: half-precision UNet and image encoder (GPU)
    sidecar_max_mb: float = 4096  # oracle: largest disparity sidecar read (its declared data size, MiB)

    def __post_init__(self):
        if not 0 <= self.overlap < self.window or self.steps < 1:
            raise ValueError(f"depth: need steps >= 1 and 0 <= overlap < window, got steps={self.steps}, "
                             f"overlap={self.overlap}, window={self.window}")
        if self.input_size < 14 or self.input_size % 14:
            raise ValueError(f"depth.input_size must be a positive multiple of 14, got {self.input_size}")
        if self.batch_size < 1:
            raise ValueError(f"depth.batch_size must be >= 1, got {self.batch_size}")
        if not self.sidecar_max_mb > 0:
            raise ValueError(f"depth.sidecar_max_mb must be > 0, got {self.sidecar_max_mb}")

    @property
    def sidecar_max_bytes(self) -> int:
        return int(self.sidecar_max_mb * 2**20)

    def resolved_weights(self) -> str | None:
        return self.weights or DEFAULT_WEIGHTS.get(self.backend)

    @property
    def smoke_test(self) -> str | None:
        """:data:`~dreamstereo.toy_models.SMOKE_TEST` when a model backend runs the toy (``weights=toy``)."""
        model = self.backend in (DepthBackendName.DEPTH_ANYTHING_V2, DepthBackendName.DEPTHCRAFTER)
        return toy_models.SMOKE_TEST if model and toy_models.is_toy(self.weights) else None


def resize_maps(maps: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Scale ``(T, H, W)`` float maps to cover ``bucket`` (height, width) and crop the centre, exactly
    as :func:`dreamstereo.stages.decode.resize_center_crop` does to the frames."""
    out_h, out_w = bucket
    t, h, w = maps.shape
    scale = max(out_h / h, out_w / w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    out = np.empty((t, out_h, out_w), np.float32)
    for k in range(t):
        out[k] = cv2.resize(maps[k].astype(np.float32), (new_w, new_h), interpolation=interp)[
            top:top + out_h, left:left + out_w]
    return out


def parse_sidecar(data: bytes, *, frames: int | None = None, size: tuple[int, int] | None = None,
                  max_bytes: int = 4096 * 2**20) -> np.ndarray:
    """The ``disparity`` array of a ``<stem>.disparity.npz`` sidecar's bytes, ``(T, H, W)`` float32.

    The array's header is checked before its data is inflated (a sidecar is untrusted corpus data: a
    small npz can declare gigabytes): its shape must fit the video when ``frames`` (frames the video
    decodes to) and ``size`` (its ``(height, width)`` in display orientation) are given, at most twice
    the video's size per side, and its data at most ``max_bytes``. An ``.npy`` content is read as well.
    NaN/inf are kept: the quality filter rejects such a clip as degenerate depth, with its scores.

    Raises:
        SampleError: ``DEPTH_UNREADABLE`` for bytes that are not one numeric array (truncated, damaged,
            another dtype, over ``max_bytes``); ``DEPTH_MISMATCH`` for a shape that does not fit the video.
    """
    try:
        with ArrayFile(data, member="disparity") as array:
            check_sidecar_shape(array.shape, frames, size)
            disparity = array.read(max_bytes)
    except ArrayFileError as exc:
        raise SampleError(ErrorCode.DEPTH_UNREADABLE, STAGE, f"unreadable disparity sidecar: {exc}") from None
    return np.asarray(disparity, dtype=np.float32)


def check_sidecar_shape(shape: tuple[int, ...], frames: int | None, size: tuple[int, int] | None) -> None:
    """Refuse a sidecar shape that cannot belong to the video (before any data is read).

    Raises:
        SampleError: ``DEPTH_MISMATCH`` naming the shape and what it should be.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise SampleError(ErrorCode.DEPTH_MISMATCH, STAGE, f"sidecar must be (T, H, W), got {tuple(shape)}")
    if frames is not None and shape[0] != frames:
        raise SampleError(ErrorCode.DEPTH_MISMATCH, STAGE, f"sidecar has {shape[0]} frames, the video {frames}")
    if size is not None:
        (sh, sw), (vh, vw) = shape[1:], size
        if abs(sh * vw - sw * vh) > 0.01 * vh * vw:  # a different aspect: not a resized copy of this video
            raise SampleError(ErrorCode.DEPTH_MISMATCH, STAGE,
                              f"sidecar is {sw}x{sh}, the video {vw}x{vh} (display orientation): aspects differ")
        if sh > 2 * vh or sw > 2 * vw:
            raise SampleError(ErrorCode.DEPTH_MISMATCH, STAGE,
                              f"sidecar is {sw}x{sh}, more than twice the video's {vw}x{vh}")


def oracle_disparity(sidecar: np.ndarray, indices: tuple[int, ...], source_frames: int,
                     source_size: tuple[int, int], bucket: tuple[int, int]) -> np.ndarray:
    """The clip's frames of a disparity sidecar, resized to the source and cropped like the frames.

    Args:
        sidecar: ``(N, h, w)`` relative disparity of the whole video (any size: it is resized).
        indices: source frame indices of the clip. source_frames: frames the video decodes to.
        source_size: ``(height, width)`` of the video in display orientation. bucket: the clip's size.

    Raises:
        SampleError: ``DEPTH_MISMATCH`` when the sidecar's frame count differs from the video's.
    """
    check_sidecar_shape(sidecar.shape, source_frames, source_size)
    out = np.empty((len(indices), *bucket), np.float32)
    for k, index in enumerate(indices):  # frame by frame: no clip-sized map at the source's size (issue 12)
        picked = np.asarray(sidecar[index], np.float32)
        if picked.shape != tuple(source_size):
            picked = cv2.resize(picked, (source_size[1], source_size[0]), interpolation=cv2.INTER_LINEAR)
        out[k] = resize_maps(picked[None], bucket)[0]
    return out


def oracle_for_clips(sidecar, clips, source_frames: int, source_size: tuple[int, int]) -> list:
    """:func:`oracle_disparity` for every clip of a video: per clip the disparity, or the SampleError
    that stands for it (``sidecar`` itself may be a SampleError: then every clip gets it)."""
    if isinstance(sidecar, SampleError):
        return [sidecar] * len(clips)
    out = []
    for clip in clips:
        try:
            out.append(oracle_disparity(sidecar, clip.indices, source_frames, source_size, clip.bucket))
        except SampleError as exc:
            out.append(exc)
    return out


def align_scale_shift(disparity: np.ndarray, samples: int = 20000) -> np.ndarray:
    """Put every frame of a per-frame relative prediction on one common scale and shift.

    Each frame ``k`` gets ``s_k * d_k + t_k`` fitted by least squares to the clip's mean min-max
    normalised frame (on a fixed pixel subsample), which removes the per-frame scale drift of
    monocular models. A frame whose fit is degenerate (``s_k <= 0``) keeps its min-max normalisation.

    Args:
        disparity: ``(T, H, W)`` float. Returns: ``(T, H, W)`` float32.
    """
    t = disparity.shape[0]
    flat = disparity.reshape(t, -1).astype(np.float64)
    lo, hi = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    normed = (flat - lo) / np.maximum(hi - lo, 1e-12)
    reference = normed.mean(axis=0)
    pick = np.random.default_rng(0).choice(flat.shape[1], size=min(samples, flat.shape[1]), replace=False)
    out = np.empty_like(flat)
    for k in range(t):
        design = np.stack([flat[k, pick], np.ones(len(pick))], axis=1)
        (scale, shift), *_ = np.linalg.lstsq(design, reference[pick], rcond=None)
        out[k] = scale * flat[k] + shift if scale > 0 else normed[k]
    return out.reshape(disparity.shape).astype(np.float32)


class DepthAnythingV2:
    """Depth Anything V2 (transformers ``AutoModelForDepthEstimation``), per frame + per-clip alignment."""

    def __init__(self, weights: str, *, device: str | torch.device = "cpu", input_size: int = 518,
                 batch_size: int = 8):
        from transformers import AutoModelForDepthEstimation  # local: transformers takes seconds to import

        self.model = load_pretrained(AutoModelForDepthEstimation, weights, "depth-anything-v2")
        self.model.to(device).eval()
        self.device, self.input_size, self.batch_size = torch.device(device), input_size, batch_size
        self.weights = weights
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def _network_size(self, h: int, w: int) -> tuple[int, int]:
        """Short side ``input_size``, both sides multiples of the 14 px patch, aspect kept."""
        scale = self.input_size / min(h, w)
        return max(14, round(h * scale / 14) * 14), max(14, round(w * scale / 14) * 14)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """``(T, H, W, 3) uint8`` -> relative disparity ``(T, H, W) float32``, larger = nearer.

        Raises:
            SampleError: ``DEPTH_FAILED`` when the model returns non-finite values.
        """
        t, h, w, _ = frames.shape
        size = self._network_size(h, w)
        out = []
        for start in range(0, t, self.batch_size):
            batch = frames[start:start + self.batch_size]
            batch = torch.from_numpy(batch if batch.flags.writeable else batch.copy()).to(self.device)
            x = batch.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
            x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False)
            x = (x - self._mean) / self._std
            pred = self.model(pixel_values=x).predicted_depth  # (B, h', w') relative inverse depth
            pred = torch.nn.functional.interpolate(pred[:, None], size=(h, w), mode="bilinear",
                                                   align_corners=False)[:, 0]
            out.append(pred.float().cpu().numpy())
        disparity = np.concatenate(out)
        if not np.isfinite(disparity).all():
            raise SampleError(ErrorCode.DEPTH_FAILED, STAGE, "depth-anything-v2 returned NaN/inf")
        return align_scale_shift(disparity)


def load_backend(cfg: DepthConfig, device: str | torch.device = "cpu"):
    """The model backend named by ``cfg`` (the oracle needs no model: see :func:`oracle_disparity`);
    ``weights=toy`` loads the built-in toy of the backend (and DepthCrafter's toy base)."""
    toy = toy_models.is_toy(cfg.weights)
    if cfg.smoke_test:
        logger.warning("depth.weights=toy: %s", cfg.smoke_test)
    if cfg.backend is DepthBackendName.DEPTH_ANYTHING_V2:
        weights = str(toy_models.toy_folder("depth-anything-v2")) if toy else cfg.resolved_weights()
        return DepthAnythingV2(weights, device=device, input_size=cfg.input_size,
                               batch_size=cfg.batch_size)
    if cfg.backend is DepthBackendName.DEPTHCRAFTER:
        from dreamstereo.stages.depthcrafter import DepthCrafter  # local: diffusers takes seconds to import

        folder = toy_models.toy_folder("depthcrafter") if toy else None
        unet, base = (str(folder / "unet"), str(folder / "svd")) if toy else (cfg.resolved_weights(), cfg.base_weights)
        return DepthCrafter(unet, base, device=device, steps=cfg.steps,
                            window=cfg.window, overlap=cfg.overlap, max_resolution=cfg.max_resolution,
                            noise_aug_strength=cfg.noise_aug_strength, fp16=cfg.fp16, chunk=cfg.batch_size)
    raise ValueError(f"depth backend {cfg.backend.value!r} has no model to load")
