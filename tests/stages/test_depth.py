"""Depth backends: the oracle sidecar, and Depth Anything V2 built at toy size from its real classes."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest

from dreamstereo.stages.decode import resize_center_crop
from dreamstereo.stages.depth import (
    DepthBackendName,
    DepthConfig,
    align_scale_shift,
    load_backend,
    oracle_disparity,
    parse_sidecar,
    resize_maps,
)
from dreamstereo.types import ErrorCode, SampleError


def test_depth_anything_v2_end_to_end_on_a_tiny_model(tiny_dav2):
    backend = load_backend(DepthConfig(backend=DepthBackendName.DEPTH_ANYTHING_V2, weights=tiny_dav2,
                                       input_size=56, batch_size=3))
    frames = (np.random.default_rng(0).random((5, 40, 72, 3)) * 255).astype(np.uint8)
    disparity = backend(frames)
    assert disparity.shape == (5, 40, 72) and disparity.dtype == np.float32 and np.isfinite(disparity).all()
    assert backend._network_size(40, 72) == (56, 98)  # short side 56, both multiples of 14
    assert np.array_equal(backend(frames), disparity)  # deterministic


def test_alignment_removes_per_frame_scale_and_shift():
    base = np.random.default_rng(1).random((1, 20, 30)) + 1.0
    drifting = np.concatenate([base * s + o for s, o in [(1, 0), (3, 5), (0.5, -2), (2, 1)]])
    aligned = align_scale_shift(drifting)
    for k in range(1, 4):
        assert np.allclose(aligned[k], aligned[0], atol=1e-4)


def test_oracle_picks_frames_and_crops_like_the_frames():
    sidecar = np.stack([np.tile(np.arange(64, dtype=np.float32), (48, 1)) + 100 * k for k in range(6)])
    out = oracle_disparity(sidecar, (1, 3), 6, (48, 64), (24, 24))
    frames = np.repeat(sidecar[[1, 3], :, :, None], 3, axis=3).clip(0, 255).astype(np.uint8)
    expected = resize_center_crop(frames, (24, 24))[..., 0].astype(np.float32)
    assert out.shape == (2, 24, 24) and np.abs(out[0] - expected[0]).max() <= 1.0
    assert out[1].min() > 300  # the fourth frame (index 3)


def test_oracle_sidecar_of_another_size_is_resized():
    sidecar = np.ones((4, 12, 16), np.float32)
    assert resize_maps(oracle_disparity(sidecar, (0,), 4, (48, 64), (48, 64)), (48, 64)).shape == (1, 48, 64)


def test_oracle_sidecar_of_another_aspect_is_a_mismatch():
    with pytest.raises(SampleError) as info:
        oracle_disparity(np.ones((4, 48, 48), np.float32), (0,), 4, (48, 64), (48, 64))
    assert info.value.code is ErrorCode.DEPTH_MISMATCH and "aspects differ" in str(info.value)


def test_oracle_with_the_wrong_frame_count_is_a_sample_error():
    with pytest.raises(SampleError) as info:
        oracle_disparity(np.zeros((5, 8, 8), np.float32), (0, 1), 9, (8, 8), (8, 8))
    assert info.value.code is ErrorCode.DEPTH_MISMATCH and "5 frames, the video 9" in str(info.value)


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("make, code", [
    (lambda good: good[: len(good) // 2], "depth_unreadable"),  # a partial upload
    (lambda good: b"\x00" * 100, "depth_unreadable"),
    (lambda good: _npz(disparity=np.zeros((4, 8, 12), [("d", "f4"), ("c", "f4")])), "depth_unreadable"),
    (lambda good: _npz(depth=np.zeros((4, 8, 12)), other=np.zeros(2)), "depth_unreadable"),
    (lambda good: _npz(disparity=np.zeros((5, 8, 12), np.float32)), "depth_mismatch"),  # frames
    (lambda good: _npz(disparity=np.zeros((4, 8, 8), np.float32)), "depth_mismatch"),  # aspect
    (lambda good: _npz(disparity=np.zeros((4, 80, 120), np.float32)), "depth_mismatch"),  # 10x the video
    (lambda good: _npz(disparity=np.zeros((8, 12), np.float32)), "depth_mismatch"),  # not (T, H, W)
])
def test_a_bad_sidecar_is_a_sample_error_with_its_code(make, code):
    good = _npz(disparity=np.ones((4, 8, 12), np.float32))
    with pytest.raises(SampleError) as info:
        parse_sidecar(make(good), frames=4, size=(8, 12))
    assert info.value.code.value == code


def test_sidecar_npy_content_under_the_npz_name_is_read():
    buffer = io.BytesIO()
    np.save(buffer, np.full((4, 8, 12), 2, np.float16))
    out = parse_sidecar(buffer.getvalue(), frames=4, size=(8, 12))
    assert out.dtype == np.float32 and out.shape == (4, 8, 12) and (out == 2).all()


def test_a_sidecar_bomb_is_refused_before_it_is_inflated():
    bomb = _npz(disparity=np.zeros((250, 512, 512), np.float32))  # 250 MiB declared, well under 1 MB stored
    tracemalloc.start()
    try:
        with pytest.raises(SampleError) as info:
            parse_sidecar(bomb, frames=49, size=(512, 512))
        with pytest.raises(SampleError, match="more than the limit") as over:
            parse_sidecar(bomb, frames=250, size=(512, 512), max_bytes=100 * 2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code.value == "depth_mismatch" and over.value.code.value == "depth_unreadable"
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"
