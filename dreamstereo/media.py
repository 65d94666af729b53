"""Reading and writing images, videos and disparity files for the command line tools.

Frames leave and enter here as ``(T, H, W, 3)`` uint8 RGB (or float32 in [0, 1] where noted);
disparity as ``(T, H, W)`` float32 pixels. Writers go through a temporary name and a rename, so a
failed write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import av
import cv2
import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
DISPARITY_SUFFIXES = {".npy", ".npz", ".pfm", ".png"}


class MediaError(ValueError):
    """A file that cannot be read or has the wrong content; the message names the file and the reason."""


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write to; rename it to ``path`` on success, delete on error."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- images


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` float32 RGB in [0, 1] (8- or 16-bit files)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{str(path)!r}: no such file")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise MediaError(f"{str(path)!r}: not a readable image")
    scale = 65535.0 if raw.dtype == np.uint16 else 255.0
    if raw.ndim == 2:
        raw = np.repeat(raw[..., None], 3, axis=2)
    rgb = cv2.cvtColor(raw[..., :3], cv2.COLOR_BGR2RGB)
    return rgb.astype(np.float32) / scale


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write ``(H, W, 3)`` RGB (uint8, or float in [0, 1]) or ``(H, W)`` gray/bool as an 8-bit image."""
    img = to_uint8(image)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), img):
            raise MediaError(f"{str(path)!r}: could not write image")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 view of an image: bool -> {0, 255}, float [0, 1] -> rounded, uint8 unchanged."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- disparity


def read_disparity(path: str | Path, *, scale: float = 1.0) -> np.ndarray:
    """Read disparity in pixels as ``(T, H, W)`` float32 (a single map becomes ``T = 1``).

    Formats: ``.npy``; ``.npz`` with an array named ``disparity`` (or a single array); ``.pfm``; an 8- or
    16-bit ``.png`` whose values times ``scale`` are pixels. ``scale`` multiplies every format.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise MediaError(f"disparity file {str(path)!r}: no such file")
    if suffix not in DISPARITY_SUFFIXES:
        raise MediaError(f"disparity file {str(path)!r}: unsupported format {suffix!r}; "
                         f"use one of {sorted(DISPARITY_SUFFIXES)}")
    try:
        if suffix == ".npy":
            disp = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "disparity" in z.files:
                    disp = z["disparity"]
                elif len(z.files) == 1:
                    disp = z[z.files[0]]
                else:
                    raise MediaError(f"disparity file {str(path)!r}: no array named 'disparity' "
                                     f"(has {z.files})")
        elif suffix == ".pfm":
            disp = _read_pfm(path)
        else:
            disp = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if disp is None:
                raise MediaError(f"disparity file {str(path)!r}: not a readable PNG")
            if disp.ndim == 3:
                raise MediaError(f"disparity file {str(path)!r}: PNG has {disp.shape[2]} channels, need 1")
    except (OSError, ValueError) as exc:
        if isinstance(exc, MediaError):
            raise
        raise MediaError(f"disparity file {str(path)!r}: cannot read ({exc})") from None
    disp = np.asarray(disp)
    if disp.ndim == 2:
        disp = disp[None]
    if disp.ndim != 3 or not np.issubdtype(disp.dtype, np.number):
        raise MediaError(f"disparity file {str(path)!r}: need a numeric (H, W) or (T, H, W) array, "
                         f"got {disp.dtype} {disp.shape}")
    disp = disp.astype(np.float32) * np.float32(scale)
    if not np.isfinite(disp).all():
        raise MediaError(f"disparity file {str(path)!r}: has NaN or inf values")
    return disp


def _read_pfm(path: Path) -> np.ndarray:
    """Read a grayscale PFM (``Pf``) as ``(H, W)`` float32, top row first."""
    with open(path, "rb") as fh:
        header = fh.readline().strip()
        if header != b"Pf":
            raise MediaError(f"disparity file {str(path)!r}: PFM header {header!r}, need b'Pf' (grayscale)")
        dims = re.findall(rb"\d+", fh.readline())
        scale = float(fh.readline().strip())
        w, h = int(dims[0]), int(dims[1])
        data = np.fromfile(fh, dtype="<f4" if scale < 0 else ">f4", count=w * h)
    if data.size != w * h:
        raise MediaError(f"disparity file {str(path)!r}: PFM holds {data.size} values, need {w * h}")
    return np.flipud(data.reshape(h, w)).astype(np.float32)


def write_pfm(path: str | Path, disparity: np.ndarray) -> None:
    """Write an ``(H, W)`` float map as a little-endian grayscale PFM."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        h, w = disparity.shape
        fh.write(b"Pf\n%d %d\n-1.0\n" % (w, h))
        np.flipud(disparity.astype("<f4")).tofile(fh)


# ----------------------------------------------------------------------------- video


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode every frame of a video as ``(T, H, W, 3)`` uint8 RGB, and its frame rate."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{str(path)!r}: no such file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{str(path)!r}: has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.FFmpegError, IndexError, OSError) as exc:
        raise MediaError(f"{str(path)!r}: cannot decode video ({type(exc).__name__}: {exc})") from None
    if not frames:
        raise MediaError(f"{str(path)!r}: video has no decodable frames")
    return np.stack(frames), fps


def write_video(path: str | Path, frames: np.ndarray, fps: float = 24.0, *, lossless: bool = False,
                crf: int = 12) -> None:
    """Encode ``(T, H, W, 3)`` RGB (uint8 or float in [0, 1]) or ``(T, H, W)`` bool/gray frames.

    ``lossless`` writes FFV1 (use a ``.mkv`` name) with exact pixels; otherwise H.264 (``.mp4``,
    ``yuv420p``, ``crf``, faststart). Odd sizes are padded by one edge pixel for H.264's 4:2:0.
    """
    frames = to_uint8(np.asarray(frames))
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=3)
    t, h, w, _ = frames.shape
    with atomic_path(path) as tmp:
        options = {} if lossless else {"movflags": "faststart"}
        with av.open(str(tmp), mode="w", format="matroska" if lossless else "mp4",
                     options=options) as container:
            if lossless:
                stream = container.add_stream("ffv1", rate=_fps_fraction(fps))
                stream.pix_fmt = "bgr0"
            else:
                stream = container.add_stream("libx264", rate=_fps_fraction(fps))
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": "medium"}
                pad_h, pad_w = h % 2, w % 2
                if pad_h or pad_w:
                    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            stream.height, stream.width = frames.shape[1:3]
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def _fps_fraction(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)
