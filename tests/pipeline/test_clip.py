"""The clip chain (pipeline/clip.py): one rule for rejected versus failed, and the same samples whether
`dreamstereo process` runs it or the Ray operators of `generate` carry it between processes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from dreamstereo.config import load_config
from dreamstereo.io.sample import encode_sample, make_key, read_sample
from dreamstereo.pipeline.actors import INPUT_COLUMNS, PairActor, decode_batch, pack, unpack, unpack_members
from dreamstereo.pipeline.clip import ClipConfig, ClipResult, oracle_relatives, pair_clip, read_input
from dreamstereo.pipeline.process import ProcessConfig, run_process
from dreamstereo.scenes import demo_scene, write_scene
from dreamstereo.stages.disparity import CHUNK_FRAMES, normalize_disparity, sample_max_disparity
from dreamstereo.stages.pairs import make_pair
from dreamstereo.stages.quality import score_quality
from dreamstereo.types import REJECTION_CODES, ErrorCode, SampleError, SampleStatus
from tests.videos import moving_pattern, write_video

SMALL = ["depth.backend=oracle", "decode.clip_frames=9", "decode.max_clips=2", "decode.buckets=[[64,96]]",
         "decode.min_short_side=32"]


def _input_batch(uri: str) -> dict[str, np.ndarray]:
    row = {"shard": 0, "input_index": 0, "uri": uri, "problem": ""}
    return {k: np.array([row[k]], dtype=object) for k in INPUT_COLUMNS}


def _psnr(x: np.ndarray, y: np.ndarray) -> float:
    mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_each_error_code_is_a_rejection_or_a_failure_by_one_rule(code):
    result = ClipResult.from_error("/videos/a.mp4", 3, SampleError(code, "decode", "why"))
    assert result.status is (SampleStatus.REJECTED if code in (ErrorCode.TOO_SHORT, ErrorCode.TOO_SMALL)
                             else SampleStatus.FAILED)
    assert result.status is SampleStatus.for_error(code) and (code in REJECTION_CODES) == (
        result.status is SampleStatus.REJECTED)
    assert (result.key, result.reason, result.message) == (make_key("/videos/a.mp4", 3), code.value, "why")
    assert result.members is None


def test_the_depth_stage_error_of_a_clip_is_its_failed_record(tmp_path):
    video, _ = write_scene(demo_scene(width=128, height=96, num_frames=12), tmp_path / "v.mp4", fps=24)
    cfg = load_config(ClipConfig, [], SMALL)
    probe, clips = read_input(video, None, cfg.decode)
    error = SampleError(ErrorCode.DEPTH_FAILED, "depth", "no finite output")
    result = pair_clip(clips[0], 0, video, probe, error, cfg, None)
    assert (result.status, result.reason, result.members) == (SampleStatus.FAILED, "depth_failed", None)


def test_a_too_short_video_is_rejected_alike_by_process_and_the_decode_operator(tmp_path, capsys):
    """Before the chain was one, `process` called every non-fatal decode error a rejection and the Ray
    operator only TOO_SHORT / TOO_SMALL; both now ask SampleStatus.for_error."""
    video = write_video(tmp_path / "short.mp4", moving_pattern(5, 64, 96))
    cfg = load_config(ProcessConfig, [], SMALL)
    manifest = run_process(video, tmp_path / "out", cfg, echo=lambda _: None)
    assert [(c["status"], c["reason"]) for c in manifest["clips"]] == [("rejected", "too_short")]
    row = decode_batch(_input_batch(str(tmp_path / "short.mp4")), cfg=cfg)
    assert (row["status"][0], row["reason"][0]) == ("rejected", "too_short")


def test_process_and_the_ray_operators_make_the_same_samples(tmp_path):
    """The same video through `run_process` and through decode_batch -> PairActor (the operators called
    directly, as Ray calls them): same keys, verdicts and scores; the same json, mask and disparity bytes, and
    the same videos up to H.264's own noise (x264 with threads is not bit-reproducible run to run)."""
    video, _ = write_scene(demo_scene(width=160, height=96, num_frames=20, seed=3), tmp_path / "scene.mp4", fps=24)
    source = str((tmp_path / "scene.mp4").resolve())
    process_cfg = load_config(ProcessConfig, [], SMALL)
    manifest = run_process(video, tmp_path / "out", process_cfg, echo=lambda _: None)

    chain_cfg = load_config(ClipConfig, [], SMALL)
    decoded = decode_batch(_input_batch(source), cfg=chain_cfg)
    paired = PairActor(chain_cfg)(decoded)
    records = [json.loads(r) for r in paired["record"]]
    assert len(records) == len(manifest["clips"]) == 2
    for ours, theirs, members in zip(manifest["clips"], records, paired["members"]):
        assert theirs["key"] == ours["key"] and theirs["reason"] == ours["reason"]
        assert SampleStatus(theirs["status"]).label == ours["status"]
        assert theirs["scores"] == pytest.approx(ours["scores"])
        if ours["status"] == "kept":
            stored = {p.name[len(ours["key"]) + 1:]: p.read_bytes() for p in (tmp_path / "out").glob(f"{ours['key']}.*")}
            theirs_members = unpack_members(members)
            assert theirs_members.keys() == stored.keys()
            for name in ("json", "mask.npz", "disp.npz"):
                assert theirs_members[name] == stored[name], name
            a, b = read_sample(theirs_members, ours["key"]), read_sample(stored, ours["key"])
            for name in ("clean", "warped"):
                assert _psnr(getattr(a, name), getattr(b, name)) > 35, name
            assert b.meta["source"] == source
    assert any(c["status"] == "kept" for c in manifest["clips"])


def test_a_clip_worked_through_in_chunks_gives_the_whole_clip_sample(tmp_path):
    """Issue 12: pair_clip works through a clip CHUNK_FRAMES frames at a time (disparity, PBDP, encoding);
    its sample is the one the whole-clip chain makes: the same mask (bit-exact), disparity (to float16),
    mask ratio and flip, and videos as faithful as the whole clip's."""
    video, _ = write_scene(demo_scene(width=160, height=96, num_frames=21, seed=3), tmp_path / "scene.mp4", fps=24)
    cfg = load_config(ClipConfig, [], [*SMALL[:1], "decode.clip_frames=19", "decode.max_clips=1",
                                       "decode.buckets=[[64,96]]", "decode.min_short_side=32",
                                       "pairs.flip_probability=1.0"])
    probe, (clip,) = read_input(video, None, cfg.decode)
    (relative,) = oracle_relatives(video, None, probe, [clip], cfg.depth)
    assert len(clip.frames) > 2 * CHUNK_FRAMES and len(clip.frames) % CHUNK_FRAMES  # 3 chunks, the last short
    result = pair_clip(clip, 0, video, probe, relative, cfg, None, make_preview=True)
    assert result.status is SampleStatus.OK

    key = make_key(video, 0)  # the whole clip at once, as the chain did before issue 12
    px = normalize_disparity(relative, 96, sample_max_disparity(key, cfg.disparity), cfg.disparity.convergence)
    whole = make_pair(clip.frames, px, key, cfg.pairs)
    sample = read_sample(result.members, key)
    assert whole.flipped and sample.meta["flip"] is True
    assert np.array_equal(sample.mask, whole.mask)
    assert np.array_equal(sample.disparity, whole.disparity.astype(np.float16).astype(np.float32))
    assert result.scores["mask_ratio"] == float(whole.mask.mean()) == sample.meta["mask_ratio"]
    assert result.scores == dataclasses.asdict(score_quality(whole.clean, relative, whole.mask))
    # the videos: as close to the arrays as the whole arrays encoded at once (x264 is not promised to repeat
    # its bytes, so the comparison is of fidelity)
    reference = read_sample(encode_sample(whole.clean, whole.warped, whole.mask, whole.disparity, {}, clip.fps))
    for name in ("clean", "warped"):
        expected = _psnr(getattr(reference, name), getattr(whole, name))
        assert _psnr(getattr(sample, name), getattr(whole, name)) == pytest.approx(expected, abs=1.0), name
    assert result.preview is not None


@pytest.mark.parametrize("array", [np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3),
                                   np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4),
                                   np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))])
def test_rows_carry_arrays_that_unpack_without_a_copy(array):
    """Issue 12: a pair actor views its row's clip and disparity in place instead of copying them."""
    data = pack(array)
    got = unpack(data)
    assert got.dtype == array.dtype and np.array_equal(got, array) and not got.flags.writeable
    assert np.shares_memory(got, np.frombuffer(data, np.uint8))
    assert unpack(b"") is None


def test_a_rejected_clip_gets_a_sheet_of_as_far_as_it_got_and_the_pair_actor_packs_it(tmp_path):
    """Issue 13: rejected clips keep a contact sheet for `dreamstereo report`: the frame and its disparity when
    rejected before the pair (static), the whole pair when rejected after it (mask ratio); none when not asked."""
    video, _ = write_scene(demo_scene(width=160, height=96, num_frames=12, seed=3), tmp_path / "scene.mp4", fps=24)
    cfg = load_config(ClipConfig, [], [*SMALL, "decode.max_clips=1"])
    probe, (clip,) = read_input(video, None, cfg.decode)
    (relative,) = oracle_relatives(video, None, probe, [clip], cfg.depth)
    h, w = clip.frames.shape[1:3]
    static = dataclasses.replace(cfg, quality=dataclasses.replace(cfg.quality, min_motion=1e9))
    before = pair_clip(clip, 0, video, probe, relative, static, None, preview_rejected=True)
    assert (before.status, before.reason) == (SampleStatus.REJECTED, "static")
    assert before.preview.shape == (h + 4, 2 * (w + 4), 3)  # frame, disparity
    no_holes = dataclasses.replace(cfg, quality=dataclasses.replace(cfg.quality, mask_ratio=[0.9, 1.0]))
    after = pair_clip(clip, 0, video, probe, relative, no_holes, None, preview_rejected=True)
    assert (after.status, after.reason) == (SampleStatus.REJECTED, "mask_ratio_low")
    assert after.preview.shape == (2 * (h + 4), 2 * (w + 4), 3)  # frame, disparity, round trip, mask
    assert pair_clip(clip, 0, video, probe, relative, no_holes, None).preview is None
    assert pair_clip(clip, 0, video, probe, relative, cfg, None, preview_rejected=True).preview is None  # kept
    # the pair operator passes the sheet on as the rejected clip's one member, a JPEG
    decoded = decode_batch(_input_batch(video), cfg=no_holes)
    out = PairActor(no_holes, preview_rejected=True)(decoded)
    record = json.loads(out["record"][0])
    members = unpack_members(out["members"][0])
    assert record["status"] == "rejected" and list(members) == ["preview.jpg"]
    assert members["preview.jpg"][:2] == b"\xff\xd8"  # JPEG start of image
    assert PairActor(no_holes)(decoded)["members"][0] == b""
