"""Header-first array reading (dreamstereo/arrays.py): exact round trips, and every damaged, odd or
oversized file refused with a reason before its data is inflated."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest

from dreamstereo.arrays import ArrayFile, ArrayFileError


def npz_bytes(compressed: bool = True, **arrays) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def bomb(frames: int = 250, height: int = 512, width: int = 512) -> bytes:
    """A compressed npz of zeros: ``frames * height * width * 4`` bytes declared, a few hundred KB on disk."""
    return npz_bytes(disparity=np.zeros((frames, height, width), np.float32))


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4)),
    np.arange(12, dtype=">f4").reshape(3, 4),  # big-endian
    np.arange(6, dtype=np.uint16).reshape(2, 3),
])
@pytest.mark.parametrize("container", ["npy", "npz", "npz-stored"])
def test_round_trip_is_exact(array, container):
    data = npy_bytes(array) if container == "npy" else npz_bytes(container == "npz", disparity=array)
    with ArrayFile(data) as reader:
        assert reader.shape == array.shape and reader.dtype == array.dtype
        out = reader.read(max_bytes=array.nbytes)
    assert out.dtype.isnative and np.array_equal(out, array) and out.flags.writeable


def test_a_single_array_of_another_name_and_a_file_object_are_read():
    array = np.ones((2, 2), np.float32)
    assert np.array_equal(ArrayFile(npz_bytes(depth=array)).read(1 << 20), array)
    assert np.array_equal(ArrayFile(io.BytesIO(npy_bytes(array))).read(1 << 20), array)


@pytest.mark.parametrize("make, needle", [
    (lambda good: good[: len(good) // 2], "damaged archive"),  # a partial upload
    (lambda good: good[:-40], "damaged archive"),  # the zip directory cut off
    (lambda good: b"", "not an .npy or .npz"),
    (lambda good: np.random.default_rng(0).bytes(4096), "not an .npy or .npz"),
    (lambda good: npy_bytes(np.zeros(3, [("a", "f4"), ("b", "i4")])), "plain numeric"),  # structured
    (lambda good: npy_bytes(np.zeros((2, 2), np.complex64)), "plain numeric"),
    (lambda good: npz_bytes(a=np.zeros(2), b=np.zeros(2)), "no array named 'disparity'"),
    (lambda good: npy_bytes(np.zeros((4, 4), np.float32))[:-8], "truncated"),
    (lambda good: npy_bytes(np.zeros((4, 4), np.float32)).replace(b"(4, 4)", b"(4, -4)"), "header"),
])
def test_damaged_and_odd_files_are_refused_with_a_reason(make, needle):
    good = npz_bytes(disparity=np.random.default_rng(1).random((3, 16, 16), dtype=np.float32))
    with pytest.raises(ArrayFileError, match=needle):
        ArrayFile(make(good)).read(1 << 30)


def test_a_corrupted_member_fails_its_checksum():
    good = bytearray(npz_bytes(False, disparity=np.arange(4096, dtype=np.float32)))
    good[2000] ^= 0xFF  # inside the stored member's data
    with pytest.raises(ArrayFileError, match="damaged archive"):
        ArrayFile(bytes(good)).read(1 << 30)


def test_an_object_array_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    data = npy_bytes(np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(ArrayFileError, match="plain numeric"):
        ArrayFile(data).read(1 << 30)
    assert not marker.exists()


def test_a_decompression_bomb_is_refused_from_its_header_in_bounded_memory():
    data = bomb()  # 250 MiB declared
    assert len(data) < 2_000_000
    tracemalloc.start()
    try:
        with ArrayFile(data) as reader:
            assert reader.shape == (250, 512, 512) and reader.nbytes == 250 * 2**20
            with pytest.raises(ArrayFileError, match="more than the limit of 64 MiB"):
                reader.read(max_bytes=64 * 2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB while refusing a bomb"
