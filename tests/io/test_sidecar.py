"""Oracle sidecars read from a folder or S3: found beside the video, bounded, and every problem a coded
sample error (never an exception that stops the job)."""

from __future__ import annotations

import io
import types

import numpy as np
import pytest

from dreamstereo.io.sidecar import read_sidecar, sidecar_of
from dreamstereo.io.storage import S3Config, S3Storage, StorageError
from dreamstereo.stages.depth import DepthConfig
from dreamstereo.types import SampleError

PROBE = types.SimpleNamespace(frames=3, height=8, width=12)  # what decode found: decodable frames, display size


def _npz(array) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, disparity=array)
    return buffer.getvalue()


def test_sidecar_names_follow_the_video():
    assert sidecar_of("/data/a clip.v2.mp4") == "/data/a clip.v2.disparity.npz"
    assert sidecar_of("s3://b/x/clip.mov") == "s3://b/x/clip.disparity.npz"
    assert sidecar_of("clip") == "clip.disparity.npz"


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """A function writing bytes beside a video; returns the sidecar URI and the S3 settings."""
    if request.param == "local":
        def put(name, data):
            (tmp_path / name).write_bytes(data)
            return str(tmp_path / name), None
        return put
    bucket, endpoint = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_env")
    s3 = S3Config(endpoint_url=endpoint, max_attempts=1)
    storage = S3Storage(f"s3://{bucket}/videos", s3)

    def put(name, data):
        storage.write_bytes(name, data)
        return f"s3://{bucket}/videos/{name}", s3
    return put


def test_good_and_bad_sidecars_local_and_s3(place):
    good = np.random.default_rng(0).random((3, 8, 12), dtype=np.float32)
    uri, s3 = place("good.disparity.npz", _npz(good))
    assert np.array_equal(read_sidecar(uri, s3, DepthConfig(), PROBE), good)
    cases = {"cut.disparity.npz": (_npz(good)[:300], "depth_unreadable"),
             "frames.disparity.npz": (_npz(good[:2]), "depth_mismatch"),
             "huge.disparity.npz": (_npz(np.zeros((3, 8, 12), np.float32)) + bytes(2 * 2**20), "too_large")}
    tight = DepthConfig(sidecar_max_mb=0.5)
    for name, (data, code) in cases.items():
        uri, s3 = place(name, data)
        with pytest.raises(SampleError) as info:
            read_sidecar(uri, s3, tight, PROBE)
        assert info.value.code.value == code, (name, info.value)
        assert code != "too_large" or name in info.value.message


def test_a_missing_sidecar(tmp_path, s3_bucket, s3_env):
    with pytest.raises(SampleError) as info:
        read_sidecar(str(tmp_path / "none.disparity.npz"), None, DepthConfig(), PROBE)
    assert info.value.code.value == "depth_missing"
    with pytest.raises(StorageError):  # on S3 the caller tells absent from unreachable (pipeline/actors.py)
        read_sidecar(f"s3://{s3_bucket}/none.disparity.npz", S3Config(endpoint_url=s3_env, max_attempts=1),
                     DepthConfig(), PROBE)
