"""Reading and writing images, videos and disparity files for the command line tools.

Frames leave and enter here as ``(T, H, W, 3)`` uint8 RGB (or float32 in [0, 1] where noted);
disparity as ``(T, H, W)`` float32 pixels. Writers go through a temporary name and a rename, so a
failed write never leaves a half-written file under the final name; a full, read-only or forbidden
output raises :class:`WriteError`, which names the output (not the temporary) and the cause.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import heapq
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from dreamstereo.arrays import ArrayFile
from dreamstereo.stages import decode
from dreamstereo.types import UNWRITABLE_ERRNOS, ErrorCode, SampleError, UserError, os_error_reason

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
DISPARITY_SUFFIXES = {".npy", ".npz", ".pfm", ".png"}
MAX_DISPARITY_BYTES = 16 * 2**30  # declared data of a disparity file beyond which it is refused unread


class MediaError(UserError, ValueError):
    """A file that cannot be read or has the wrong content; the message names the file and the reason."""


class WriteError(OSError):
    """An output that cannot be written: a full disk, a quota, a read-only or forbidden folder. The user's
    environment, not a bug: the message names the output file (never its temporary name) and the cause.
    It stays an OSError with the original ``errno``."""

    def __init__(self, path: str | Path, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))

    def __str__(self) -> str:
        return f"cannot write {self.filename!r}: {os_error_reason(self)}"


def _raise_write_failure(exc: OSError, path: Path, *own: Path):
    """Raise ``exc`` as a :class:`WriteError` naming ``path`` when it is a refused write of ``path`` or of
    one of ``own`` (its temporary names; no file name: a failed ``write()``); else raise it unchanged
    (another file's error passing through, or a bug keeps its traceback)."""
    if isinstance(exc, WriteError) or exc.errno not in UNWRITABLE_ERRNOS:
        raise exc
    if exc.filename is not None and Path(os.fsdecode(exc.filename)) not in (path, *own, *path.parents):
        raise exc
    raise WriteError(path, exc) from None


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write to; rename it to ``path`` on success, delete on error.

    Missing parent folders are created. A write the disk refuses (full, read-only, quota, permission)
    raises :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        _raise_write_failure(exc, path, tmp)
    finally:
        if tmp.exists():  # (unlink of a missing file on a read-only disk fails with EROFS)
            tmp.unlink()


def replace_path(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, replacing a file or a whole folder of that name (put back if the
    rename fails)."""
    if not (source.is_dir() and target.exists()):
        os.replace(source, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(source, target)
    except OSError:
        os.replace(old, target)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


STAGE_PREFIX = ".staging-"  # + a unique suffix (mkdtemp); earlier versions: + <pid>
_STAGE_LOCK = ".lock"  # inside a stage, flock-ed by its run for as long as it lives
_LEGACY_STAGE = re.compile(r"\.staging-\d+")


def _remove_dead_stages(folder: Path) -> None:
    """Delete the staging folders that runs killed mid-way (kill -9, a crash) left in ``folder``: those whose
    lock no process holds (the kernel drops a lock when its process dies, on this host or, over NFS, another),
    and those of earlier versions (``.staging-<pid>``, no lock) a day old. A stage whose lock cannot be tested
    stays."""
    for entry in folder.glob(f"{STAGE_PREFIX}*"):
        try:
            if not entry.is_dir() or entry.is_symlink():
                continue
            if _LEGACY_STAGE.fullmatch(entry.name):
                if time.time() - entry.stat().st_mtime > 86_400:
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            fd = os.open(entry / _STAGE_LOCK, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:  # no lock file (not ours, or a run between mkdtemp and its lock: see _lock_stage)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a run in progress (or a file system without locks: leave it)
            os.close(fd)
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(fd)


def _lock_stage(stage: Path) -> int | None:
    """Hold an exclusive lock on ``stage/.lock`` for this run; the lock file appears already locked (made
    under another name, locked, renamed), so no other run can take it for a dead one's. None where the file
    system has no locks (the stage is then never removed by another run)."""
    tmp = stage / f"{_STAGE_LOCK}.new"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        tmp.unlink()
        return None
    os.rename(tmp, stage / _STAGE_LOCK)
    return fd


@contextlib.contextmanager
def staged_folder(folder: str | Path, *, last: tuple[str, ...] = ("manifest.json",)) -> Iterator[Path]:
    """Yield a hidden folder inside ``folder`` for all of one run's outputs; on success move them into
    ``folder`` (names in ``last`` at the end: the manifest appears only beside complete outputs), on
    error delete them. A run thus leaves all its outputs or none, and what ``folder`` held before is
    only ever replaced by a complete run (a full disk mid-run loses nothing). A ``folder`` this run
    created is removed again when the run fails and leaves it empty. What a run killed with -9 left in its
    staging folder is removed by the next run (:func:`_remove_dead_stages`).

    Raises:
        WriteError: a refused write, naming the file's final path under ``folder``.
    """
    folder = Path(folder)
    stage, lock = None, None
    created = not folder.exists()
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _remove_dead_stages(folder)
            stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=folder))
            lock = _lock_stage(stage)
            yield stage
            entries = [p for p in stage.iterdir() if p.name != _STAGE_LOCK]
            for entry in sorted(entries, key=lambda p: (p.name in last, p.name)):
                replace_path(entry, folder / entry.name)
        except WriteError as exc:  # name the file where the user will look for it
            name = Path(exc.filename)
            if stage is None or not name.is_relative_to(stage):
                raise
            raise WriteError(folder / name.relative_to(stage), exc) from None
        except OSError as exc:
            _raise_write_failure(exc, folder, *([stage] if stage else []))
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if lock is not None:
            os.close(lock)
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def write_text(path: str | Path, text: str) -> None:
    """Write a small text file (config, manifest) all-or-nothing."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ----------------------------------------------------------------------------- images


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` float32 RGB in [0, 1] (8- or 16-bit files)."""
    path = Path(path)
    _check_regular(path)
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
    # Encoded in memory and written by Python: cv2.imwrite reports a full disk only as False.
    suffix = Path(path).suffix.lower() or ".png"
    try:
        ok, encoded = cv2.imencode(suffix, img)
    except cv2.error:
        ok = False
    if not ok:
        raise MediaError(f"{str(path)!r}: cannot encode an image as {suffix!r}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())


def to_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 view of an image: bool -> {0, 255}, float [0, 1] -> rounded, uint8 unchanged."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- disparity


class DisparitySource:
    """Disparity in pixels of a clip, handed out frame range by frame range.

    Formats: ``.npy`` (memory-mapped, so a long clip is never loaded whole); ``.npz`` with an array
    named ``disparity`` (or a single array); ``.pfm``; an 8- or 16-bit ``.png`` whose values times
    ``scale`` are pixels (required for PNG: integer images store scaled values). ``scale`` multiplies
    every format (default 1). A single map counts as one frame. ``.npy``/``.npz`` are read header first:
    with ``expect`` (the ``(T, H, W)`` the input needs) a file of another shape is refused before its data
    is inflated, and no file may declare more than ``max_bytes`` of data.
    """

    def __init__(self, path: str | Path, *, scale: float | None = None, expect: tuple[int, int, int] | None = None,
                 max_bytes: int = MAX_DISPARITY_BYTES):
        self.path = Path(path)
        name, suffix = repr(str(self.path)), self.path.suffix.lower()
        if suffix == ".png" and scale is None:
            raise MediaError(f"disparity file {name}: a PNG stores scaled integers; give its scale in pixels "
                             f"per unit (--disparity-scale, e.g. 0.5 for Middlebury, 1/256 for 16-bit KITTI)")
        self.scale = 1.0 if scale is None else float(scale)
        _check_regular(self.path, "disparity file ")
        if suffix not in DISPARITY_SUFFIXES:
            raise MediaError(f"disparity file {name}: unsupported format {suffix!r}; "
                             f"use one of {sorted(DISPARITY_SUFFIXES)}")
        self.expect, self.max_bytes = expect, max_bytes
        try:
            disp = self._load(suffix)
        except (OSError, ValueError, EOFError) as exc:
            if isinstance(exc, MediaError):
                raise
            raise MediaError(f"disparity file {name}: cannot read ({exc})") from None
        if disp.ndim == 2:
            disp = disp[None]
        if disp.ndim != 3 or not (np.issubdtype(disp.dtype, np.floating) or np.issubdtype(disp.dtype, np.integer)):
            raise MediaError(f"disparity file {name}: need a numeric (H, W) or (T, H, W) array, "
                             f"got {disp.dtype} {disp.shape}")
        self._array = disp

    def _load(self, suffix: str) -> np.ndarray:
        name = repr(str(self.path))
        if suffix in (".npy", ".npz"):
            with open(self.path, "rb") as fh, ArrayFile(fh, member="disparity") as array:
                shape = (1, *array.shape) if len(array.shape) == 2 else array.shape
                if self.expect is not None and shape != tuple(self.expect):
                    raise MediaError(f"disparity file {name}: shape (T, H, W) = {shape} does not match the input's "
                                     f"{tuple(self.expect)}")
                if suffix == ".npy" and not array.fortran_order and array.nbytes <= self.max_bytes:
                    # memory-mapped, so a long clip is never loaded whole (np.load checks the file's length)
                    return np.load(self.path, mmap_mode="r", allow_pickle=False)
                return array.read(self.max_bytes)
        if suffix == ".pfm":
            return _read_pfm(self.path)
        disp = cv2.imread(str(self.path), cv2.IMREAD_UNCHANGED)
        if disp is None:
            raise MediaError(f"disparity file {name}: not a readable PNG")
        if disp.ndim == 3:
            raise MediaError(f"disparity file {name}: PNG has {disp.shape[2]} channels, need 1")
        return disp

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(T, H, W)``."""
        return tuple(self._array.shape)

    def frames(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``start:stop`` as ``(n, H, W)`` float32 pixels; MediaError if any value is NaN/inf."""
        disp = np.asarray(self._array[start:stop], dtype=np.float32) * np.float32(self.scale)
        if not np.isfinite(disp).all():
            raise MediaError(f"disparity file {str(self.path)!r}: has NaN or inf values "
                             f"(frames {start}..{start + len(disp) - 1})")
        return disp


def read_disparity(path: str | Path, *, scale: float | None = None) -> np.ndarray:
    """Read a whole disparity file as ``(T, H, W)`` float32 pixels; see :class:`DisparitySource`."""
    return DisparitySource(path, scale=scale).frames()


def _read_pfm(path: Path) -> np.ndarray:
    """Read a grayscale PFM (``Pf``) as ``(H, W)`` float32, top row first."""
    with open(path, "rb") as fh:
        header = fh.readline().strip()
        if header != b"Pf":
            raise MediaError(f"disparity file {str(path)!r}: PFM header {header!r}, need b'Pf' (grayscale)")
        dims = re.findall(rb"\d+", fh.readline())
        try:
            scale = float(fh.readline().strip())
        except ValueError:
            scale = None
        if len(dims) != 2 or scale is None:
            raise MediaError(f"disparity file {str(path)!r}: PFM header needs 'width height' and a scale line")
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


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a probe of a video file found."""

    frames: int  # number of frames (counted from packets when the container does not say)
    fps: float
    width: int
    height: int


def _check_regular(path: Path, what: str = "") -> None:
    """MediaError unless ``path`` is a regular file (a FIFO would block a reader, a device never end)."""
    if not path.is_file():
        raise MediaError(f"{what}{str(path)!r}: " + ("not a regular file" if path.exists() else "no such file"))


def _open_video(path: Path):
    _check_regular(path)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, IndexError, OSError) as exc:
        raise MediaError(f"{str(path)!r}: cannot open video ({type(exc).__name__}: {exc})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{str(path)!r}: has no video stream")
    return container


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and stored size of a video file (``stages.decode.probe_video`` on the open
    file: the count is of the frames that decode, the size as the frames are stored, before any display
    rotation, as :func:`iter_video` yields them)."""
    path = Path(path)
    _check_regular(path)
    with open(path, "rb") as fh:
        try:
            probe = decode.probe_video(fh, count_frames=True)
        except SampleError as exc:
            if exc.code is ErrorCode.NO_VIDEO_STREAM:
                raise MediaError(f"{str(path)!r}: has no video stream") from None
            raise MediaError(f"{str(path)!r}: cannot open video ({exc.message})") from None
    width, height = (probe.height, probe.width) if probe.rotation in (90, 270) else (probe.width, probe.height)
    return VideoInfo(frames=probe.frames, fps=probe.fps or 25.0, width=int(width), height=int(height))


def iter_video(path: str | Path, chunk_frames: int = 16) -> Iterator[np.ndarray]:
    """Decode a video in chunks of up to ``chunk_frames`` frames, each ``(n, H, W, 3)`` uint8 RGB."""
    path = Path(path)
    container = _open_video(path)
    chunk: list[np.ndarray] = []
    decoded = 0
    try:
        for frame in container.decode(container.streams.video[0]):
            chunk.append(frame.to_ndarray(format="rgb24"))
            decoded += 1
            if len(chunk) == chunk_frames:
                yield np.stack(chunk)
                chunk = []
    except (av.FFmpegError, IndexError, OSError) as exc:
        raise MediaError(f"{str(path)!r}: cannot decode video after {decoded} frame(s) "
                         f"({type(exc).__name__}: {exc})") from None
    finally:
        container.close()
    if chunk:
        yield np.stack(chunk)
    elif decoded == 0:
        raise MediaError(f"{str(path)!r}: video has no decodable frames")


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode every frame of a video as ``(T, H, W, 3)`` uint8 RGB, and its frame rate."""
    fps = probe_video(path).fps
    return np.concatenate(list(iter_video(path, chunk_frames=64))), fps


class VideoWriter:
    """Encode frames chunk by chunk; the file appears under its name only when the writer closes cleanly.

    ``lossless`` writes FFV1 (use a ``.mkv`` name) with exact pixels; otherwise H.264 (``.mp4``,
    ``yuv420p``, ``crf``, faststart). Odd sizes are padded by one edge pixel for H.264's 4:2:0.
    Frames: ``(n, H, W, 3)`` RGB (uint8 or float in [0, 1]) or ``(n, H, W)`` bool/gray.
    """

    def __init__(self, path: str | Path, fps: float = 24.0, *, lossless: bool = False, crf: int = 12,
                 preset: str = "medium", threads: int | None = None):
        self.path = Path(path)
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        self.lossless = lossless
        try:
            self._container = av.open(str(tmp), mode="w", format="matroska" if lossless else "mp4",
                                      options={} if lossless else {"movflags": "faststart"})
            codec = "ffv1" if lossless else "libx264"
            self._stream = self._container.add_stream(codec, rate=_fps_fraction(fps))
            self._stream.pix_fmt = "bgr0" if lossless else "yuv420p"
            if not lossless:
                # threads: x264's threads (None: x264 chooses); see io/sample.py VIDEO_THREADS
                self._stream.options = {"crf": str(crf), "preset": preset,
                                        **({} if threads is None else {"threads": str(threads)})}
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        self._sized = False

    def write(self, frames: np.ndarray) -> None:
        frames = to_uint8(np.asarray(frames))
        if frames.ndim == 3:
            frames = np.repeat(frames[..., None], 3, axis=3)
        if not self.lossless and (frames.shape[1] % 2 or frames.shape[2] % 2):
            frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)),
                            mode="edge")
        if not self._sized:
            self._stream.height, self._stream.width = frames.shape[1:3]
            self._sized = True
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            try:
                if exc_type is None:
                    for packet in self._stream.encode():
                        self._container.mux(packet)
            finally:
                self._container.close()
        except BaseException as error:  # the final flush failed (a full disk): no temporary file stays
            self._atomic.__exit__(type(error), error, error.__traceback__)
            raise
        self._atomic.__exit__(exc_type, exc, tb)


def write_video(path: str | Path, frames: np.ndarray, fps: float = 24.0, *, lossless: bool = False,
                crf: int = 12, preset: str = "medium", threads: int | None = None) -> None:
    """Encode all of ``frames`` into one file; see :class:`VideoWriter`."""
    with VideoWriter(path, fps, lossless=lossless, crf=crf, preset=preset, threads=threads) as writer:
        writer.write(frames)


class ImageSequenceWriter:
    """Write frames as ``000000.png, ...`` into a folder that appears (or is replaced) only on a clean close."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._tmp = self.folder.with_name(f".{self.folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(self._tmp, ignore_errors=True)
        try:
            self._tmp.mkdir(parents=True)
        except OSError as exc:
            _raise_write_failure(exc, self.folder, self._tmp)
        self._count = 0

    def write(self, frames: np.ndarray) -> None:
        for frame in frames:
            name = f"{self._count:06d}.png"
            try:
                write_image(self._tmp / name, frame)
            except WriteError as exc:
                raise WriteError(self.folder / name, exc) from None
            self._count += 1

    def __enter__(self) -> "ImageSequenceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        replace_path(self._tmp, self.folder)


def _fps_fraction(fps: float):
    if not fps > 0:
        raise MediaError(f"frame rate must be > 0, got {fps}")
    return Fraction(fps).limit_denominator(1001)


def encode_video_bytes(frames: np.ndarray, fps: float, *, crf: int = 10, preset: str = "medium",
                       threads: int | None = None) -> bytes:
    """H.264 mp4 (yuv420p, faststart) of ``(T, H, W, 3)`` frames, returned as bytes.

    faststart rewrites the file after encoding, which FFmpeg only does on a named file, so the video is
    encoded into a private temporary file and read back.
    """
    with tempfile.TemporaryDirectory(prefix="dreamstereo-") as tmp:
        path = Path(tmp) / "clip.mp4"
        write_video(path, frames, fps, crf=crf, preset=preset, threads=threads)
        return path.read_bytes()


def decode_video_bytes(data: bytes) -> np.ndarray:
    """Every frame of an in-memory video as ``(T, H, W, 3) uint8``."""
    try:
        with av.open(io.BytesIO(data)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise MediaError(f"in-memory video: cannot decode ({type(exc).__name__}: {exc})") from None


def decode_first_frame_bytes(data: bytes) -> np.ndarray:
    """The first frame of an in-memory video as ``(H, W, 3) uint8`` (only that frame is decoded)."""
    try:
        with av.open(io.BytesIO(data)) as container:
            for frame in container.decode(video=0):
                return frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, ValueError, IndexError) as exc:
        raise MediaError(f"in-memory video: cannot decode ({type(exc).__name__}: {exc})") from None
    raise MediaError("in-memory video: no frame decodes")


def has_audio(path: str | Path) -> bool:
    """Whether a media file has an audio stream."""
    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio)
    except (av.FFmpegError, IndexError, OSError):
        return False


def mux_audio(video: str | Path, audio_source: str | Path, out: str | Path, *, seconds: float | None = None) -> bool:
    """Write ``out``: the video stream of ``video`` plus the first audio stream of ``audio_source``, both
    copied without re-encoding (audio packets up to ``seconds`` when given); mp4 with faststart,
    written atomically. Returns False (and writes nothing) when the source has no audio.

    Raises:
        MediaError: the audio codec cannot go into an mp4 by copying.
    """
    with av.open(str(audio_source)) as source:
        if not source.streams.audio:
            return False
        with av.open(str(video)) as picture, atomic_path(out) as tmp:
            in_video, in_audio = picture.streams.video[0], source.streams.audio[0]
            try:
                with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "faststart"}) as sink:
                    out_video = sink.add_stream_from_template(in_video)
                    out_audio = sink.add_stream_from_template(in_audio)
                    audio = ((p, out_audio) for p in source.demux(in_audio)
                             if seconds is None or p.pts is None or float(p.pts * in_audio.time_base) < seconds)
                    packets = heapq.merge(((p, out_video) for p in picture.demux(in_video)), audio,
                                          key=_decode_time)  # each stream is in decode order: stream them
                    for packet, stream in packets:
                        if packet.dts is None:  # the demuxer's flush packets
                            continue
                        packet.stream = stream
                        sink.mux(packet)
            except (av.FFmpegError, ValueError) as exc:
                raise MediaError(f"{str(audio_source)!r}: cannot copy its audio ({type(exc).__name__}: {exc})") \
                    from None
    return True


def _decode_time(item) -> float:
    packet = item[0]
    return float(packet.dts * packet.time_base) if packet.dts is not None else float("inf")
