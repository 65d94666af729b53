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


def _children() -> list[str]:
    """Live or unreaped child processes of this process (a contained decode leaves none)."""
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        found += (task / "children").read_text().split()
    return found


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


def test_a_native_crash_is_a_recorded_failure_after_bounded_attempts():
    data = _hostile()
    with pytest.raises(SampleError) as info:
        decode_contained(data, dataclasses.replace(DecodeConfig(), attempts=3))
    assert info.value.code is ErrorCode.DECODE_CRASHED and ErrorCode.DECODE_CRASHED not in RETRYABLE_CODES
    assert info.value.message == "decoder killed by SIGSEGV (3 attempts)" and info.value.stage == "decode"
    assert _children() == []


def test_attempts_and_timeout_are_validated():
    with pytest.raises(ValueError, match="decode.attempts"):
        DecodeConfig(attempts=0)
    with pytest.raises(ValueError, match="decode.timeout_s"):
        DecodeConfig(timeout_s=0)
