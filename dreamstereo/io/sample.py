"""The training-sample format: WebDataset members of one pseudo-stereo pair, and their reader.

A sample is a set of members that share a key (docs/dataset-format.md):

``<key>.rgb.mp4``     V1, the clean clip, H.264 yuv420p (crf 10), faststart
``<key>.warped.mp4``  V1', the double-projection round trip, same encoding
``<key>.mask.npz``    M1, bit-packed along the width (``bits``) with its ``shape``; lossless
``<key>.disp.npz``    disparity of V1 in pixels (``disparity``, float16)
``<key>.json``        metadata: source, frames, fps, size, bucket, baseline, flip, scores, versions

Keys contain no dots (webdataset splits a member name at the first dot of its last path part), are
deterministic and traceable to the source: a sanitised stem, 8 hex digits of a hash of the full source
URI (so equal stems from different folders stay apart) and the clip index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dreamstereo.io import media
from dreamstereo.types import UserError

MEMBERS = ("rgb.mp4", "warped.mp4", "mask.npz", "disp.npz", "json")
RAW_MEMBERS = ("rgb.mp4", "json")  # `generate mode=raw`: clean clips for Stage 1 training
FORMAT_VERSION = 1


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


def encode_sample(clean: np.ndarray, warped: np.ndarray, mask: np.ndarray, disparity: np.ndarray,
                  meta: dict, fps: float) -> dict[str, bytes]:
    """The members of one sample as bytes, keyed by extension (see the module docstring)."""
    t, h, w = mask.shape
    if clean.shape != (t, h, w, 3) or warped.shape != clean.shape or disparity.shape != (t, h, w):
        raise SampleFormatError(f"sample arrays disagree: clean {clean.shape}, warped {warped.shape}, "
                         f"mask {mask.shape}, disparity {disparity.shape}")
    meta = {**meta, "format_version": FORMAT_VERSION}
    return {
        "rgb.mp4": media.encode_video_bytes(clean, fps),
        "warped.mp4": media.encode_video_bytes(warped, fps),
        "mask.npz": _npz_bytes(bits=np.packbits(mask.astype(bool), axis=-1),
                               shape=np.asarray(mask.shape, np.int64)),
        "disp.npz": _npz_bytes(disparity=disparity.astype(np.float16)),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def encode_raw_sample(clean: np.ndarray, meta: dict, fps: float) -> dict[str, bytes]:
    """The members of a raw clip (``rgb.mp4`` + ``json``), for Stage 1 training on random masks."""
    return {"rgb.mp4": media.encode_video_bytes(clean, fps),
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
