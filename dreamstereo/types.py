"""Canonical layouts, enums and result types shared by every part of DreamStereo.

Layouts (change them here, nowhere else):

* frames at the edges (files, Ray batches): ``(T, H, W, 3) uint8``;
* frames inside stages: ``(T, 3, H, W)`` float32 (or float64) in ``[0, 1]``;
* disparity: ``(T, H, W)`` float in pixels of the view it belongs to, larger = nearer;
* masks: ``(T, H, W) bool``, True = hole / not visible.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this floor module stays free of heavy imports
    import torch


# Frames per pass when a stage works through a clip in chunks (decode hand-over, disparity, PBDP, quality,
# encoding): temporaries stay a few frames big whatever the clip's length (issue 12). One number for all.
CHUNK_FRAMES = 8


class Direction(str, enum.Enum):
    """Where view 2 lies relative to view 1.

    ``RIGHT``: view 2 is to the right, a view-1 pixel at ``x`` appears at ``x - d`` in view 2.
    ``LEFT``: view 2 is to the left, the pixel appears at ``x + d``.
    """

    RIGHT = "right"
    LEFT = "left"

    @property
    def opposite(self) -> "Direction":
        return Direction.LEFT if self is Direction.RIGHT else Direction.RIGHT

    @property
    def sign(self) -> int:
        """Sign ``s`` of the mapping ``x -> x + s * d``."""
        return -1 if self is Direction.RIGHT else 1


class WarpMethod(str, enum.Enum):
    """Which warper makes a view: ours (GAPW) or one of the forward-splat baselines."""

    GAPW = "gapw"  # backward warping with a Jacobian hole mask (this project)
    SOFT_SPLAT = "soft_splat"  # depth-weighted bilinear splat, as StereoCrafter
    ZBUFFER_SPLAT = "zbuffer_splat"  # nearest-surface point splat, as iw3


class WarpResult(tuple):
    """``(view, disparity, mask)`` of one warp; also readable by name.

    view: ``(T, 3, H, W)`` float, the synthesized view.
    disparity: ``(T, H, W)`` float, disparity in pixels of the synthesized view (in holes: the
        background-side value for GAPW, 0 for the splat baselines).
    mask: ``(T, H, W)`` bool, True where the synthesized view has no source (hole).
    """

    __slots__ = ()

    def __new__(cls, view: torch.Tensor, disparity: torch.Tensor, mask: torch.Tensor):
        return super().__new__(cls, (view, disparity, mask))

    view = property(lambda self: self[0])
    disparity = property(lambda self: self[1])
    mask = property(lambda self: self[2])


@dataclasses.dataclass(frozen=True)
class DoubleProjection:
    """Result of a parallax-based double projection (PBDP), view 1 -> view 2 -> view 1.

    Attributes:
        view2: ``(T, 3, H, W)`` float in [0, 1], view 1 warped to view 2.
        disparity2: ``(T, H, W)`` float, pixels, disparity of view 2 (in holes: background-filled for
            GAPW, 0 for the splat baselines).
        mask2: ``(T, H, W)`` bool, holes of view 2 (disocclusions and frame borders).
        view1: ``(T, 3, H, W)`` float in [0, 1], the round trip back to view 1.
        mask1: ``(T, H, W)`` bool, pixels of view 1 that view 2 cannot see.
    """

    view2: torch.Tensor
    disparity2: torch.Tensor
    mask2: torch.Tensor
    view1: torch.Tensor
    mask1: torch.Tensor


class DepthBackendName(str, enum.Enum):
    """Where a clip's depth comes from (``stages/depth.py``)."""

    ORACLE = "oracle"  # a disparity sidecar beside the video
    DEPTH_ANYTHING_V2 = "depth-anything-v2"
    DEPTHCRAFTER = "depthcrafter"


class ErrorCode(str, enum.Enum):
    """Why a sample failed (a data problem, recorded per sample; infrastructure faults raise instead)."""

    READ_FAILED = "read_failed"  # the input could not be read from storage (may be transient)
    INVALID_URI = "invalid_uri"  # the manifest row names no usable input (empty, not text, unsupported scheme)
    NOT_A_FILE = "not_a_file"  # the input is a FIFO, a device or a folder, not a regular file
    TOO_LARGE = "too_large"  # the input is larger than decode.max_input_mb
    DECODE_FAILED = "decode_failed"  # the bytes are not a readable video
    DECODE_CRASHED = "decode_crashed"  # the native decoder crashed or hung on it every time (pipeline/isolate.py)
    NO_VIDEO_STREAM = "no_video_stream"  # e.g. an audio-only file
    TOO_SHORT = "too_short"  # fewer frames than one clip needs
    TOO_SMALL = "too_small"  # below the smallest accepted frame size
    DEPTH_MISSING = "depth_missing"  # the oracle backend found no usable sidecar
    DEPTH_UNREADABLE = "depth_unreadable"  # the sidecar is there but is not one numeric array (damaged, too big)
    DEPTH_MISMATCH = "depth_mismatch"  # sidecar frames or size do not match the video
    DEPTH_FAILED = "depth_failed"  # the depth model produced no finite output


RETRYABLE_CODES = frozenset({ErrorCode.READ_FAILED, ErrorCode.DEPTH_FAILED})  # `generate --retry-failed`
# Codes that are a verdict on the input (it is valid but unusable), not a failure: recorded as rejected.
REJECTION_CODES = frozenset({ErrorCode.TOO_SHORT, ErrorCode.TOO_SMALL})


class SampleStatus(str, enum.Enum):
    """What became of one clip: the one vocabulary of every record (parquet rows, Ray rows, manifests)."""

    PENDING = "pending"  # decoded, on its way through depth and the pair stage (Ray rows only; never stored)
    OK = "ok"  # a sample was written
    REJECTED = "rejected"  # a verdict: the quality filter or a REJECTION_CODES input
    FAILED = "failed"  # an ErrorCode: the data could not be processed

    @classmethod
    def for_error(cls, code: ErrorCode) -> "SampleStatus":
        """The status a sample error stands for: rejected for REJECTION_CODES, failed otherwise."""
        return cls.REJECTED if code in REJECTION_CODES else cls.FAILED

    @property
    def label(self) -> str:
        """How ``dreamstereo process`` names it in its lines and manifest (``kept`` for OK, as it always has)."""
        return "kept" if self is SampleStatus.OK else self.value


class UserError(Exception):
    """Bad input or an environment the user can fix (a full disk, a missing weight, a bad setting): the CLI
    prints its one-line message and exits 2. Everything else is a bug and keeps its traceback."""


# What every command maps to exit status 2 (cli.py and the Ray Train setup path): OSError covers missing
# files, no permission and full or read-only outputs, named by the code that raised them.
USER_ERRORS = (UserError, OSError)


class SampleError(Exception):
    """A data-dependent failure of one sample: caught per row and recorded, never a crash."""

    def __init__(self, code: ErrorCode, stage: str, message: str):
        super().__init__(f"{stage}: {code.value}: {message}")
        self.code, self.stage, self.message = code, stage, message


class RejectReason(str, enum.Enum):
    """Why the quality filter dropped a clip (a verdict, not an error)."""

    MASK_RATIO_LOW = "mask_ratio_low"  # almost nothing to inpaint
    MASK_RATIO_HIGH = "mask_ratio_high"  # holes cover too much of the frame
    DEGENERATE_DEPTH = "degenerate_depth"  # constant or tiny-range disparity
    SCENE_CUT = "scene_cut"  # the clip spans a shot boundary
    STATIC = "static"  # blank or near-static clip
    TOO_SHORT = "too_short"
    TOO_SMALL = "too_small"


# What a full, read-only or forbidden output looks like: the user's environment, not a bug in the code.
UNWRITABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def os_error_reason(exc: OSError) -> str:
    """``No space left on device [ENOSPC]``: the cause of an OSError without its file name (callers name
    the file the user knows, not a temporary one)."""
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text} [{name}]" if name else text


def write_error_reason(exc: BaseException) -> str:
    """:func:`os_error_reason` of an OSError; the message of the error type a library raises instead for a
    refused write (safetensors' ``SafetensorError`` carries the OS reason in its text)."""
    return os_error_reason(exc) if isinstance(exc, OSError) else str(exc)


def original_error(exc: BaseException, wanted: type | tuple[type, ...]) -> BaseException | None:
    """The first exception of a ``wanted`` class (one of ours) inside what Ray raised, or None (a bug).

    Ray wraps what a task or worker raised: ``RayTaskError`` (whose ``cause`` is the original, and which
    also subclasses the original's class, with a traceback for its message), ``__cause__`` chains, and
    Ray Train's ``WorkerGroupError.worker_failures`` (rank -> exception). The original class is the one
    defined in ``dreamstereo``, so its one-line message reaches the user.
    """
    todo, seen = [exc], set()
    while todo:
        error = todo.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, wanted) and type(error).__module__.startswith("dreamstereo"):
            return error
        failures = getattr(error, "worker_failures", None)
        if isinstance(failures, dict):
            todo.extend(failures[rank] for rank in sorted(failures))
        todo.extend([getattr(error, "cause", None), error.__cause__, error.__context__])
    return None
