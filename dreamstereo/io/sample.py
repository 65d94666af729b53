"""The training-sample format: WebDataset members of one pseudo-stereo pair, and their reader.

A sample is a set of members that share a key (docs/dataset-format.md):

``<key>.rgb.mp4``     V1, the clean clip, H.264 yuv420p (crf 10, x264 veryfast, one thread), faststart
``<key>.warped.mp4``  V1', the double-projection round trip, same encoding
``<key>.mask.npz``    M1, bit-packed along the width (``bits``) with its ``shape``; lossless
``<key>.disp.npz``    disparity of V1 in pixels (``disparity``, float16)
``<key>.json``        metadata: source, frames, fps, size, bucket, baseline, flip, scores, versions

Keys contain no dots (webdataset splits a member name at the first dot of its last path part), are
deterministic and traceable to the source: a sanitised stem, 8 hex digits of a hash of the full source
URI (so equal stems from different folders stay apart) and the clip index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dreamstereo.io import media
from dreamstereo.types import UserError

MEMBERS = ("rgb.mp4", "warped.mp4", "mask.npz", "disp.npz", "json")
RAW_MEMBERS = ("rgb.mp4", "json")  # `generate mode=raw`: clean clips for Stage 1 training
FORMAT_VERSION = 2  # 2: x264 veryfast on one thread (issue 12); 1: medium with x264's threads. Read alike.
# How rgb.mp4 and warped.mp4 are encoded (docs/benchmarks.md, "Sample encoding (issue 12)"): against medium,
# veryfast costs 0.38x the CPU for -0.35 dB at the same size. One thread: a worker per core already keeps the
# cores busy in `generate`, and x264 then holds far fewer frames (docs/benchmarks.md, "Memory per clip").
VIDEO_CRF = 10
VIDEO_PRESET = "veryfast"
VIDEO_THREADS = 1


class SampleFormatError(UserError, ValueError):
    """Sample members that do not make one sample (missing or disagreeing members); names the sample."""


def make_key(source: str, clip_index: int) -> str:
    """``<sanitised stem>-<hash8>-c<index>``: no dots, at most 64 characters, same input -> same key."""
    stem = Path(source.rstrip("/")).name.rsplit(".", 1)[0] or "video"
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:40] or "video"
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return f"{clean}-{digest}-c{clip_index:03d}"


@dataclasses.dataclass(frozen=True)
class Sample:
    """A decoded sample.

    clean, warped: ``(T, H, W, 3) uint8``; mask: ``(T, H, W) bool`` (True = hole); disparity:
    ``(T, H, W) float32`` pixels; meta: the JSON metadata.
    """

    key: str
    clean: np.ndarray
    warped: np.ndarray
    mask: np.ndarray
    disparity: np.ndarray
    meta: dict


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


class _NpzStream:
    """One array of known shape and dtype written into a compressed ``.npz`` (the layout
    ``np.savez_compressed`` writes, read back by ``np.load``) part by part along its first axis, so the
    whole array is never held: only its compressed bytes."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype):
        self.shape, self.dtype, self._written = tuple(shape), np.dtype(dtype), 0
        self._buffer = io.BytesIO()
        self._zip = zipfile.ZipFile(self._buffer, mode="w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
        self._member = self._zip.open(f"{name}.npy", mode="w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._member, header)

    def write(self, part: np.ndarray) -> None:
        part = np.ascontiguousarray(part, dtype=self.dtype)
        if part.shape[1:] != self.shape[1:] or self._written + len(part) > self.shape[0]:
            raise SampleFormatError(f"npz part of shape {part.shape} does not fit {self.shape} after "
                                    f"{self._written} rows")
        self._member.write(part.data)
        self._written += len(part)

    def close(self) -> bytes:
        if self._written != self.shape[0]:
            raise SampleFormatError(f"npz array {self.shape} got only {self._written} rows")
        self._member.close()
        self._zip.close()
        return self._buffer.getvalue()


class SampleEncoder:
    """The members of one sample, encoded chunk by chunk of frames (issue 12): the two videos stream into
    their H.264 encoders, the mask is bit-packed and the disparity compressed as each chunk arrives, so
    a clip's warped frames, mask and disparity are never held whole. Give ``add`` the frames in order;
    ``finish`` returns the members (what :func:`encode_sample` returns for the same arrays, up to the
    H.264 encoder's own run-to-run differences). Use as a context manager; ``close`` discards.

    Args:
        shape: ``(T, H, W)`` of the clip. fps: frame rate of the videos.
    """

    def __init__(self, shape: tuple[int, int, int], fps: float):
        t, h, w = (int(v) for v in shape)
        if min(t, h, w) < 1:
            raise SampleFormatError(f"sample shape (T, H, W) must be positive, got {tuple(shape)}")
        self.shape, self._added = (t, h, w), 0
        self._tmp = Path(tempfile.mkdtemp(prefix="dreamstereo-sample-"))
        self._videos: dict[str, media.VideoWriter] = {}
        try:
            for member in ("rgb.mp4", "warped.mp4"):
                self._videos[member] = media.VideoWriter(self._tmp / member, fps, crf=VIDEO_CRF,
                                                         preset=VIDEO_PRESET, threads=VIDEO_THREADS)
        except BaseException:
            self.close()
            raise
        self._mask_bits: list[np.ndarray] = []
        self._disparity = _NpzStream("disparity", self.shape, np.float16)

    def add(self, clean: np.ndarray, warped: np.ndarray, mask: np.ndarray, disparity: np.ndarray) -> None:
        """The next frames: ``clean``, ``warped`` ``(n, H, W, 3) uint8``, ``mask`` ``(n, H, W) bool``,
        ``disparity`` ``(n, H, W)`` float pixels."""
        n = len(mask)
        if (mask.shape[1:] != self.shape[1:] or clean.shape != (*mask.shape, 3) or warped.shape != clean.shape
                or disparity.shape != mask.shape or self._added + n > self.shape[0]):
            raise SampleFormatError(f"sample arrays disagree: clean {clean.shape}, warped {warped.shape}, "
                                    f"mask {mask.shape}, disparity {disparity.shape}, sample {self.shape} with "
                                    f"{self._added} frames added")
        self._videos["rgb.mp4"].write(clean)
        self._videos["warped.mp4"].write(warped)
        self._mask_bits.append(np.packbits(mask.astype(bool), axis=-1))
        self._disparity.write(disparity.astype(np.float16))
        self._added += n

    def finish(self, meta: dict) -> dict[str, bytes]:
        """Close the encoders and return the members (see the module docstring)."""
        if self._added != self.shape[0]:
            raise SampleFormatError(f"sample of {self.shape[0]} frames got {self._added}")
        try:
            videos = {}
            for member, writer in self._videos.items():
                writer.__exit__(None, None, None)
                videos[member] = (self._tmp / member).read_bytes()
            self._videos = {}
            return {
                **videos,
                "mask.npz": _npz_bytes(bits=np.concatenate(self._mask_bits),
                                       shape=np.asarray(self.shape, np.int64)),
                "disp.npz": self._disparity.close(),
                "json": json.dumps({**meta, "format_version": FORMAT_VERSION}, sort_keys=True).encode(),
            }
        finally:
            self.close()

    def close(self) -> None:
        """Discard whatever was encoded (after ``finish`` only the temporary folder is left to remove)."""
        for writer in self._videos.values():
            with contextlib.suppress(Exception):
                writer.__exit__(RuntimeError, RuntimeError("sample discarded"), None)
        self._videos, self._mask_bits = {}, []
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "SampleEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_sample(clean: np.ndarray, warped: np.ndarray, mask: np.ndarray, disparity: np.ndarray,
                  meta: dict, fps: float) -> dict[str, bytes]:
    """The members of one sample as bytes, keyed by extension (see the module docstring)."""
    t, h, w = mask.shape
    if clean.shape != (t, h, w, 3) or warped.shape != clean.shape or disparity.shape != (t, h, w):
        raise SampleFormatError(f"sample arrays disagree: clean {clean.shape}, warped {warped.shape}, "
                         f"mask {mask.shape}, disparity {disparity.shape}")
    with SampleEncoder((t, h, w), fps) as encoder:
        encoder.add(clean, warped, mask, disparity)
        return encoder.finish(meta)


def encode_raw_sample(clean: np.ndarray, meta: dict, fps: float) -> dict[str, bytes]:
    """The members of a raw clip (``rgb.mp4`` + ``json``), for Stage 1 training on random masks."""
    return {"rgb.mp4": media.encode_video_bytes(clean, fps, crf=VIDEO_CRF, preset=VIDEO_PRESET,
                                                 threads=VIDEO_THREADS),
            "json": json.dumps({**meta, "format_version": FORMAT_VERSION}, sort_keys=True).encode()}


def read_sample(members: Mapping[str, bytes], key: str = "") -> Sample:
    """Decode a sample from its members (extension -> bytes, as webdataset yields them, with or without
    a leading dot, e.g. ``{"rgb.mp4": ..., ...}`` or ``{".rgb.mp4": ...}``).

    Raises:
        ValueError: a member is missing or the arrays disagree in shape.
    """
    members = {k.lstrip("."): v for k, v in members.items()}
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise SampleFormatError(f"sample {key or members.get('__key__', '?')!r} lacks members {missing}")
    meta = json.loads(members["json"])
    with np.load(io.BytesIO(members["mask.npz"])) as z:
        shape = tuple(int(v) for v in z["shape"])
        mask = np.unpackbits(z["bits"], axis=-1, count=shape[-1]).astype(bool).reshape(shape)
    with np.load(io.BytesIO(members["disp.npz"])) as z:
        disparity = z["disparity"].astype(np.float32)
    clean = media.decode_video_bytes(members["rgb.mp4"])[:, : shape[1], : shape[2]]
    warped = media.decode_video_bytes(members["warped.mp4"])[:, : shape[1], : shape[2]]
    if clean.shape[:3] != shape or warped.shape[:3] != shape or disparity.shape != shape:
        raise SampleFormatError(f"sample {key!r}: members disagree: mask {shape}, rgb {clean.shape}, "
                         f"warped {warped.shape}, disparity {disparity.shape}")
    return Sample(key or meta.get("key", ""), clean, warped, mask, disparity, meta)


def write_sample_files(folder: str | Path, key: str, members: Mapping[str, bytes]) -> list[str]:
    """Write members as ``folder/<key>.<ext>`` (each atomically); return the file names."""
    folder = Path(folder)
    names = []
    for ext, data in members.items():
        path = folder / f"{key}.{ext}"
        with media.atomic_path(path) as tmp:
            tmp.write_bytes(data)
        names.append(path.name)
    return names


def read_sample_files(folder: str | Path, key: str) -> Sample:
    """Read a sample written by :func:`write_sample_files`."""
    folder = Path(folder)
    return read_sample({ext: (folder / f"{key}.{ext}").read_bytes() for ext in MEMBERS
                        if (folder / f"{key}.{ext}").is_file()}, key)
