"""Decoding in a child process: the same clips as a direct decode, errors cross back, crashes are contained."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from dreamstereo.pipeline.isolate import DecodeChildError, decode_contained
from dreamstereo.stages.decode import DecodeConfig, decode_clips
from dreamstereo.types import RETRYABLE_CODES, ErrorCode, SampleError
from tests.conftest import SHARED_DATA
from tests.videos import moving_pattern, write_video

SMALL = DecodeConfig(clip_frames=5, max_clips=3, buckets=[[48, 64]], min_short_side=16)
HOSTILE = SHARED_DATA / "hostile" / "dolphins_mutated_segv.mp4"


def _all_children() -> list[str]:
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        found += (task / "children").read_text().split()
    return found


_BEFORE: set[str] = set()


@pytest.fixture(autouse=True)
def _children_before_the_test():
    """The children this process had when the test began (the session's Ray, when an earlier test started it)."""
    _BEFORE.clear()
    _BEFORE.update(_all_children())
    yield


def _children() -> list[str]:
    """Live or unreaped child processes this test left behind (a contained decode leaves none)."""
    return [pid for pid in _all_children() if pid not in _BEFORE]


def _hostile() -> bytes:
    if not HOSTILE.is_file():
        pytest.skip(f"hostile video not found at {HOSTILE} (set DREAMSTEREO_SHARED_DATA)")
    return HOSTILE.read_bytes()


def test_contained_decode_equals_the_direct_decode(tmp_path):
    data = open(write_video(tmp_path / "a.mp4", moving_pattern(16, 96, 128), fps=24), "rb").read()
    probe, clips = decode_clips(data, SMALL)
    contained_probe, contained = decode_contained(data, SMALL)
    assert contained_probe == probe and len(contained) == len(clips) == 3
    for a, b in zip(contained, clips):
        assert (a.indices, a.fps, a.bucket) == (b.indices, b.fps, b.bucket)
        assert a.frames.dtype == np.uint8 and a.frames.flags.writeable and np.array_equal(a.frames, b.frames)
    assert _children() == []


def test_a_sample_error_in_the_child_crosses_back_unchanged():
    garbage = np.random.default_rng(0).bytes(5000)
    with pytest.raises(SampleError) as direct:
        decode_clips(garbage, SMALL)
    with pytest.raises(SampleError) as contained:
        decode_contained(garbage, SMALL)
    assert (contained.value.code, contained.value.stage, contained.value.message) == \
        (direct.value.code, direct.value.stage, direct.value.message)
    assert contained.value.code is ErrorCode.DECODE_FAILED


def test_a_bug_in_the_child_keeps_its_traceback(tmp_path):
    data = open(write_video(tmp_path / "a.mp4", moving_pattern(8, 48, 64)), "rb").read()
    broken = dataclasses.replace(SMALL)
    broken.clip_frames = "five"  # not an int: a TypeError in the child is a bug, not bad input
    with pytest.raises(DecodeChildError, match=r"(?s)Traceback.*TypeError"):
        decode_contained(data, broken)


def test_a_decoder_that_overruns_is_killed_and_recorded(tmp_path):
    data = open(write_video(tmp_path / "a.mp4", moving_pattern(16, 96, 128)), "rb").read()
    with pytest.raises(SampleError) as info:
        decode_contained(data, dataclasses.replace(SMALL, timeout_s=0.001))
    assert info.value.code is ErrorCode.DECODE_CRASHED
    assert info.value.message == "decoder timed out after 0.001 s (2 attempts)"
    assert _children() == []


_CRASH_SCRIPT = """
import os, sys
import dreamstereo.pipeline.clip  # what `process` and the Ray decode task have loaded (torch among them)
from dreamstereo.pipeline.isolate import decode_contained
from dreamstereo.stages.decode import DecodeConfig
from dreamstereo.types import SampleError
try:
    decode_contained(open(sys.argv[1], "rb").read(), DecodeConfig(attempts=3))
except SampleError as exc:
    print(exc.code.value, exc.stage, exc.message, sep="|")
task = f"/proc/{os.getpid()}/task"
print("children:", sum(len(open(f"{task}/{t}/children").read().split()) for t in os.listdir(task)))
"""


def test_a_native_crash_is_a_recorded_failure_after_bounded_attempts():
    """In a fresh interpreter, as `process` and a Ray decode task run it (whether the hostile file's
    invalid read faults depends on the heap the decoder finds: after other decodes in this test process
    it sometimes does not)."""
    import subprocess
    import sys

    _hostile()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("PYTHONFAULTHANDLER", None)
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(HOSTILE)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr  # the interpreter that asked survives
    assert proc.stdout.splitlines() == ["decode_crashed|decode|decoder killed by SIGSEGV (3 attempts)", "children: 0"]
    assert ErrorCode.DECODE_CRASHED not in RETRYABLE_CODES


def test_attempts_and_timeout_are_validated():
    with pytest.raises(ValueError, match="decode.attempts"):
        DecodeConfig(attempts=0)
    with pytest.raises(ValueError, match="decode.timeout_s"):
        DecodeConfig(timeout_s=0)


def _short_copy(source: Path, path: Path, codec: str, frames: int = 14, size: tuple[int, int] = (48, 80)) -> bytes:
    """The first ``frames`` frames of a real video at ``size`` (height, width), re-encoded with PyAV: mutants
    of it decode in milliseconds, and still carry real-camera content."""
    import av

    with av.open(str(source)) as container:
        decoded = []
        for frame in container.decode(video=0):
            decoded.append(frame.reformat(width=size[1], height=size[0], format="rgb24").to_ndarray())
            if len(decoded) == frames:
                break
    return open(write_video(path, np.stack(decoded), codec=codec), "rb").read()


def _mutate(data: bytes, rng: np.random.Generator, kind: str) -> bytes:
    """One seeded mutation: flipped bytes anywhere, a truncation, or random bytes over the header."""
    out = bytearray(data)
    if kind == "flip":
        for position in rng.integers(0, len(out), size=int(rng.integers(1, 40))):
            out[position] ^= int(rng.integers(1, 256))
    elif kind == "truncate":
        out = out[: int(rng.integers(8, len(out)))]
    else:  # the first kilobyte holds ftyp/moov (faststart): box sizes, sample tables, codec setup
        start, size = int(rng.integers(0, min(1024, len(out) - 64))), int(rng.integers(4, 64))
        out[start:start + size] = rng.bytes(size)
    return bytes(out)


@pytest.mark.realdata
def test_fuzzed_real_videos_end_as_clips_or_known_sample_errors(tmp_path):
    """24 seeded mutants of the shared videos, each decoded in a child: every outcome is clips or a
    SampleError with a decode code; no exception escapes, no crash gets out of the child."""
    import collections
    import time

    sources = sorted((SHARED_DATA / "videos").glob("*.mp4"))
    if not sources:
        pytest.skip(f"real videos not found in {SHARED_DATA / 'videos'} (set DREAMSTEREO_SHARED_DATA)")
    codecs = ("libx264", "mpeg4")  # decord and PyAV through two FFmpeg decoders
    bases = [_short_copy(s, tmp_path / f"{k}.mp4", codecs[k % 2]) for k, s in enumerate(sources)]
    rng = np.random.default_rng(20261202)
    mutants = [_mutate(bases[k % len(bases)], rng, ("flip", "truncate", "header")[k % 3]) for k in range(24)]
    cfg = DecodeConfig(clip_frames=5, max_clips=2, buckets=[[48, 80]], min_short_side=16, timeout_s=10)
    known = {ErrorCode.DECODE_FAILED, ErrorCode.DECODE_CRASHED, ErrorCode.NO_VIDEO_STREAM, ErrorCode.TOO_SHORT,
             ErrorCode.TOO_SMALL}
    outcomes: collections.Counter = collections.Counter()
    start = time.monotonic()
    for mutant in mutants:
        try:
            probe, clips = decode_contained(mutant, cfg)
        except SampleError as exc:
            assert exc.code in known and exc.stage == "decode", exc
            outcomes[exc.code.value] += 1
            continue
        assert clips and all(c.frames.shape == (5, 48, 80, 3) and c.frames.dtype == np.uint8 for c in clips)
        assert max(max(c.indices) for c in clips) < probe.frames
        outcomes["clips"] += 1
    assert time.monotonic() - start < 30, outcomes
    assert sum(outcomes.values()) == 24 and outcomes["clips"] and outcomes["clips"] < 24, outcomes
    assert _children() == []
