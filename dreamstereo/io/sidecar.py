"""The oracle depth backend's input: ``<video stem>.disparity.npz`` beside each video, local or on S3.

A sidecar is untrusted corpus data like the video: it is read as a regular file of bounded size and
parsed header first (:func:`dreamstereo.stages.depth.parse_sidecar`), and every problem with it becomes a
per-sample :class:`SampleError` with its own code.
"""

from __future__ import annotations

import os

import numpy as np

from dreamstereo.io.storage import StorageError, read_uri
from dreamstereo.stages.depth import DepthConfig, parse_sidecar
from dreamstereo.types import ErrorCode, SampleError

SIDECAR_SUFFIX = ".disparity.npz"


def sidecar_of(uri: str) -> str:
    """``<video stem>.disparity.npz`` beside a video (local path or ``s3://`` URI): the oracle backend's input."""
    head, sep, name = uri.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{head}{sep}{stem}{SIDECAR_SUFFIX}"


def read_sidecar(uri: str, s3, cfg: DepthConfig, probe=None) -> np.ndarray:
    """The oracle disparity sidecar at ``uri``, ``(T, H, W)`` float32, checked against the video's
    decodable frames and size (``probe``: ``frames``, ``height``, ``width`` in display orientation) before
    its data is read (see :func:`parse_sidecar`); every message names the sidecar.

    Raises:
        SampleError: ``DEPTH_MISSING`` when there is none; ``NOT_A_FILE``, ``TOO_LARGE``,
            ``DEPTH_UNREADABLE`` or ``DEPTH_MISMATCH`` for one that cannot serve.
        StorageError: an ``s3://`` sidecar that cannot be read (maybe transient).
    """
    # The file may be as large as its data plus an npz/npy header; its declared data is checked on parsing.
    limit = cfg.sidecar_max_bytes + 2**20
    local = "://" not in uri
    if local and not os.path.lexists(uri):
        raise SampleError(ErrorCode.DEPTH_MISSING, "depth", f"disparity sidecar {uri!r}: no such file")
    try:
        data = read_uri(uri, s3, max_bytes=limit)
    except SampleError as exc:
        raise SampleError(exc.code, "depth", f"disparity sidecar {exc.message}") from None
    except StorageError as exc:
        if not local:
            raise
        raise SampleError(ErrorCode.READ_FAILED, "depth", f"disparity sidecar {exc}") from None
    frames, size = (probe.frames, (probe.height, probe.width)) if probe is not None else (None, None)
    try:
        return parse_sidecar(data, frames=frames, size=size, max_bytes=cfg.sidecar_max_bytes)
    except SampleError as exc:  # name the file: the message ends up in the shard's parquet or on stderr
        raise SampleError(exc.code, exc.stage, f"{uri!r}: {exc.message}") from None
