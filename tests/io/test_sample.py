"""The sample format round-trips: mask bit-exact, disparity to float16, frames within codec tolerance."""

from __future__ import annotations

import io

import numpy as np
import pytest

from dreamstereo.io import media
from dreamstereo.io.sample import (
    FORMAT_VERSION,
    MEMBERS,
    SampleEncoder,
    SampleFormatError,
    encode_sample,
    make_key,
    read_sample,
    read_sample_files,
    write_sample_files,
)
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
    assert sample.meta["source"] == "x.mp4" and sample.meta["format_version"] == FORMAT_VERSION == 2


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


def test_a_sample_encoded_chunk_by_chunk_reads_back_as_the_whole():
    """Issue 12: SampleEncoder takes a clip a few frames at a time; the sample reads back as one encoded
    whole: mask bit-exact, disparity to float16 (the streamed npz is what np.load reads), frames to H.264."""
    clean, warped, mask, disparity = _arrays(t=7)
    with SampleEncoder(mask.shape, 12.0) as encoder:
        for s in range(0, 7, 3):
            encoder.add(clean[s:s + 3], warped[s:s + 3], mask[s:s + 3], disparity[s:s + 3])
        members = encoder.finish({"source": "x.mp4"})
    whole = read_sample(encode_sample(clean, warped, mask, disparity, {"source": "x.mp4"}, fps=12.0), "k")
    chunked = read_sample(members, "k")
    assert np.array_equal(chunked.mask, mask) and np.array_equal(chunked.disparity, whole.disparity)
    assert np.array_equal(chunked.disparity, disparity.astype(np.float16).astype(np.float32))
    assert psnr(chunked.clean / 255, clean / 255) > 35 and psnr(chunked.warped / 255, whole.warped / 255) > 35
    with np.load(io.BytesIO(members["disp.npz"])) as z:
        assert z.files == ["disparity"] and z["disparity"].dtype == np.float16


def test_a_sample_encoder_names_what_does_not_fit():
    clean, warped, mask, disparity = _arrays(t=4)
    with SampleEncoder(mask.shape, 12.0) as encoder:
        with pytest.raises(SampleFormatError, match="disagree.*mask \\(2, 48, 64\\)"):
            encoder.add(clean[:3], warped[:3], mask[:2], disparity[:3])
        encoder.add(clean[:3], warped[:3], mask[:3], disparity[:3])
        with pytest.raises(SampleFormatError, match="sample of 4 frames got 3"):
            encoder.finish({})
    with pytest.raises(SampleFormatError, match="must be positive"):
        SampleEncoder((0, 48, 64), 12.0)


@pytest.mark.parametrize("disparity_dtype", [np.float16, np.float32])
def test_a_format_1_sample_is_still_read(disparity_dtype):
    """Shards written before issue 12 (format 1: x264 medium with x264's own threads; here also a float32
    disparity) read with today's reader: same members, same layouts."""
    clean, warped, mask, disparity = _arrays()

    def npz(**arrays):
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    members = {  # built the way format 1 wrote them, without today's encoder
        "rgb.mp4": media.encode_video_bytes(clean, 12.0, crf=10, preset="medium"),
        "warped.mp4": media.encode_video_bytes(warped, 12.0, crf=10, preset="medium"),
        "mask.npz": npz(bits=np.packbits(mask, axis=-1), shape=np.asarray(mask.shape, np.int64)),
        "disp.npz": npz(disparity=disparity.astype(disparity_dtype)),
        "json": b'{"format_version": 1, "key": "old", "source": "x.mp4"}',
    }
    sample = read_sample(members)
    assert sample.key == "old" and sample.meta["format_version"] == 1
    assert np.array_equal(sample.mask, mask) and sample.disparity.dtype == np.float32
    assert np.array_equal(sample.disparity, disparity.astype(disparity_dtype).astype(np.float32))
    assert psnr(sample.clean / 255, clean / 255) > 35 and sample.warped.shape == warped.shape
