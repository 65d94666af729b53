"""Containment of native decoding: :func:`decode_clips` runs in a forked child process.

The clip decoder is native code (FFmpeg through decord and PyAV, OpenCV) and some inputs crash it: the
shared corpus holds a real video (``hostile/dolphins_mutated_segv.mp4``) that kills decord 0.6.0 with
SIGSEGV. Run in the calling process, such a crash ends ``dreamstereo process`` with status -11 and no
message, and in ``generate`` it kills the Ray worker, so Ray Data retried the task forever (168 worker
restarts in 11 minutes, no shard committed). Here the child dies instead; the parent sees how it ended,
tries again up to ``decode.attempts`` times and then reports the input as a ``DECODE_CRASHED`` sample
error, which the callers record like any other bad input.

Why fork: the child starts with the parent's imports and the encoded bytes already in memory (copy on
write), so containment costs a few milliseconds per video, not a fresh interpreter. decord readers are
opened inside ``decode_clips``, i.e. in the child (a reader made before a fork aborts the child).

What comes back is plain data, never a pickle: one JSON header (probe, per clip its indices, fps, bucket
and array shape, or the child's SampleError) followed by the raw ``uint8`` frames, read straight from the
pipe into the arrays the caller gets (one kernel copy, no intermediate buffers).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import select
import signal
import struct
import time
import traceback

import numpy as np

from dreamstereo.stages.decode import STAGE, Clip, DecodeConfig, VideoProbe, decode_clips
from dreamstereo.types import ErrorCode, SampleError

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("<Q")  # byte length of the JSON header that opens the child's reply
_PIPE_BYTES = 1 << 20  # a larger pipe buffer: fewer wake-ups while ~100 MB clips stream through it


class DecodeChildError(RuntimeError):
    """The decode child raised something other than a SampleError: a bug, re-raised in the parent with
    the child's traceback (it is not bad input, so it is not turned into a sample error)."""


class _Crashed(Exception):
    """The child ended without a complete reply (killed by a signal, exited, or ran out of time)."""


def decode_contained(data: bytes, cfg: DecodeConfig) -> tuple[VideoProbe, list[Clip]]:
    """:func:`~dreamstereo.stages.decode.decode_clips` in a child process, with a wall-clock limit.

    Args:
        data: the encoded file's bytes.
        cfg: clip sampling and buckets; ``cfg.attempts`` children at most, each given ``cfg.timeout_s``.

    Returns:
        What ``decode_clips`` returns: the probe and the clips (``frames (T, H, W, 3) uint8``).

    Raises:
        SampleError: the child's own (``DECODE_FAILED``, ``TOO_SHORT``, ...) with its code and message, or
            ``DECODE_CRASHED`` when every attempt ended in a crash or a timeout.
        DecodeChildError: the child raised an unexpected exception (a bug; the message holds its traceback).
    """
    reason = ""
    for attempt in range(1, cfg.attempts + 1):
        try:
            return _decode_in_child(data, cfg)
        except _Crashed as exc:
            reason = str(exc)
            # debug only: the outcome is recorded with the sample (and `process` prints it as its one line)
            logger.debug("decoder %s (attempt %d/%d, %d bytes of input)", reason, attempt, cfg.attempts, len(data))
    raise SampleError(ErrorCode.DECODE_CRASHED, STAGE,
                      f"decoder {reason} ({cfg.attempts} attempt{'s' if cfg.attempts > 1 else ''})")


def _decode_in_child(data: bytes, cfg: DecodeConfig) -> tuple[VideoProbe, list[Clip]]:
    read_fd, write_fd = os.pipe()
    try:
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except OSError:  # above the system's pipe-max-size: the default buffer only costs speed
        pass
    pid = os.fork()
    if pid == 0:  # the child: never returns, never runs the parent's exit handlers (Ray's among them)
        os.close(read_fd)
        _child(data, cfg, write_fd)
    os.close(write_fd)
    deadline = time.monotonic() + cfg.timeout_s
    reply, ended = None, None
    try:
        reply = _receive(read_fd, deadline)
    except _Crashed as exc:
        ended = str(exc)
    finally:
        os.close(read_fd)
        status = _reap(pid, deadline)
    if reply is None:
        reason = status or ended
        raise _Crashed(f"timed out after {cfg.timeout_s:g} s" if reason == "timed out" else reason)
    return reply


def _child(data: bytes, cfg: DecodeConfig, fd: int):
    """Decode, send the reply, and leave with ``os._exit`` whatever happens."""
    code = 1
    try:
        arrays: list[np.ndarray] = []
        try:
            probe, clips = decode_clips(data, cfg)
            arrays = [np.ascontiguousarray(c.frames, dtype=np.uint8) for c in clips]
            header = {"probe": dataclasses.asdict(probe),
                      "clips": [{"indices": list(c.indices), "fps": c.fps, "bucket": list(c.bucket),
                                 "shape": list(a.shape)} for c, a in zip(clips, arrays)]}
        except SampleError as exc:
            header = {"error": {"code": exc.code.value, "stage": exc.stage, "message": exc.message}}
        except Exception:
            header = {"bug": traceback.format_exc()}
        encoded = json.dumps(header).encode()
        _write_all(fd, _LENGTH.pack(len(encoded)) + encoded)
        for array in arrays:
            _write_all(fd, memoryview(array).cast("B"))
        code = 0
    finally:
        os._exit(code)


def _write_all(fd: int, view) -> None:
    view = memoryview(view)
    while view:
        view = view[os.write(fd, view):]


def _receive(fd: int, deadline: float) -> tuple[VideoProbe, list[Clip]]:
    """Read the child's reply; raises SampleError/DecodeChildError as the child reported them."""
    (length,) = _LENGTH.unpack(_read_exact(fd, bytearray(_LENGTH.size), deadline))
    header = json.loads(bytes(_read_exact(fd, bytearray(length), deadline)))
    if "error" in header:
        error = header["error"]
        raise SampleError(ErrorCode(error["code"]), error["stage"], error["message"])
    if "bug" in header:
        raise DecodeChildError(f"decode_clips raised in the decode child:\n{header['bug']}")
    probe = VideoProbe(**header["probe"])
    clips = []
    for meta in header["clips"]:
        frames = np.empty(meta["shape"], np.uint8)
        _read_exact(fd, frames.reshape(-1), deadline)  # straight into the array the caller keeps
        clips.append(Clip(frames, tuple(meta["indices"]), meta["fps"], tuple(meta["bucket"])))
    return probe, clips


def _read_exact(fd: int, buffer, deadline: float):
    """Fill ``buffer`` (a bytearray or a 1-D uint8 array) from ``fd``; _Crashed on EOF or past the deadline."""
    view, got = memoryview(buffer).cast("B"), 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while got < len(view):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise _Crashed("timed out")
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise _Crashed("ended without a result")
        got += n
    return buffer


def _reap(pid: int, deadline: float) -> str | None:
    """Wait for the child (killing it once the deadline has passed); how it ended, or None if it exited 0."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timed out"
        time.sleep(0.002)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:  # a signal without a name (real-time signals)
            return f"killed by signal {number}"
    code = os.waitstatus_to_exitcode(status)
    return f"exited with status {code}" if code else None
