"""The sample format round-trips: mask bit-exact, disparity to float16, frames within codec tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from dreamstereo.io import media
from dreamstereo.io.sample import MEMBERS, encode_sample, make_key, read_sample, read_sample_files, write_sample_files
from dreamstereo.scenes import demo_scene
from dreamstereo.stages.metrics import psnr


def _arrays(t=5, h=48, w=64):
    rng = np.random.default_rng(0)
    # Content that has been through 4:2:0 once, as every decoded source clip has.
    clean = media.decode_video_bytes(media.encode_video_bytes(demo_scene(width=w, height=h, num_frames=t)
                                                              .frames_uint8(), 12))
    warped = clean.copy()
    mask = rng.random((t, h, w)) > 0.8
    warped[mask] = 0
    disparity = (rng.random((t, h, w)) * 40 - 5).astype(np.float32)
    return clean, warped, mask, disparity


def test_keys_are_deterministic_dot_free_and_traceable():
    key = make_key("s3://bucket/videos/My Clip.v2 (final).mp4", 3)
    assert "." not in key and key.startswith("My_Clip_v2_final-") and key.endswith("-c003") and len(key) <= 64
    assert key == make_key("s3://bucket/videos/My Clip.v2 (final).mp4", 3)
    assert make_key("a/clip.mp4", 0) != make_key("b/clip.mp4", 0)  # same stem, different source
    assert make_key("/data/видео.mp4", 0).endswith("-c000")  # non-ASCII stems still give a key


def test_round_trip_through_members():
    clean, warped, mask, disparity = _arrays()
    members = encode_sample(clean, warped, mask, disparity, {"source": "x.mp4", "fps": 12.0}, fps=12.0)
    assert set(members) == set(MEMBERS)
    assert members["rgb.mp4"][4:8] == b"ftyp" and members["rgb.mp4"][:200].find(b"moov") > 0  # faststart
    sample = read_sample(members, "k")
    assert np.array_equal(sample.mask, mask)  # bit-exact
    assert np.allclose(sample.disparity, disparity, atol=0.02)  # float16 pixels
    assert sample.clean.shape == clean.shape and psnr(sample.clean / 255, clean / 255) > 35  # H.264 crf 10
    assert sample.meta["source"] == "x.mp4" and sample.meta["format_version"] == 1


def test_round_trip_through_a_webdataset_tar_and_files(tmp_path):
    import webdataset as wds

    clean, warped, mask, disparity = _arrays()
    members = encode_sample(clean, warped, mask, disparity, {"source": "x.mp4"}, fps=12.0)
    key = make_key("x.mp4", 0)
    with wds.TarWriter(str(tmp_path / "shard.tar")) as sink:
        sink.write({"__key__": key, **members})
    (got,) = list(wds.WebDataset(str(tmp_path / "shard.tar"), shardshuffle=False))
    assert got["__key__"] == key and np.array_equal(read_sample(got, key).mask, mask)
    names = write_sample_files(tmp_path / "files", key, members) if (tmp_path / "files").mkdir() is None else []
    assert sorted(names) == sorted(f"{key}.{m}" for m in MEMBERS)
    assert np.array_equal(read_sample_files(tmp_path / "files", key).mask, mask)


def test_missing_member_and_mismatched_arrays_are_named():
    clean, warped, mask, disparity = _arrays()
    members = encode_sample(clean, warped, mask, disparity, {}, fps=12.0)
    del members["disp.npz"]
    with pytest.raises(ValueError, match="lacks members \\['disp.npz'\\]"):
        read_sample(members, "k")
    with pytest.raises(ValueError, match="disagree"):
        encode_sample(clean, warped, mask[:2], disparity, {}, fps=12.0)
