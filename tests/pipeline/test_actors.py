"""The Ray operators, called directly on batches (no Ray): what travels between operators survives exactly,
with no pickle; what each operator makes of a good and a bad row; the declared column contract."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dreamstereo.config import load_config
from dreamstereo.pipeline.actors import (
    CONTRACT,
    DECODE_COLUMNS,
    PAIR_COLUMNS,
    WRITE_COLUMNS,
    DepthActor,
    PairActor,
    decode_batch,
    pack,
    pack_members,
    unpack,
    unpack_members,
    write_batch,
)
from dreamstereo.pipeline.clip import ClipConfig
from dreamstereo.scenes import demo_scene, write_scene
from dreamstereo.stages.decode import decode_clips
from dreamstereo.stages.depth import load_backend


def test_members_round_trip_exactly_whatever_their_bytes():
    members = {"clean.mp4": b"\n\x00\xff" * 100, "json": b'{"a": "\\n"}', "empty.npz": b"", "mask.npz": b"\n"}
    data = pack_members(members)
    assert unpack_members(data) == members and list(unpack_members(data)) == list(members)
    assert b"pickle" not in data and not data.startswith(b"\x80")  # a JSON index, not a pickle


def test_arrays_round_trip_as_npy_bytes():
    frames = np.random.default_rng(0).integers(0, 255, (2, 4, 6, 3), np.uint8)
    assert np.array_equal(unpack(pack(frames)), frames) and unpack(pack(None)) is None


# ----------------------------------------------------------------------------------------------------
# The operators called directly on batches (no Ray): what each one does to a row, good and bad.

# 20 frames of 192x128 -> 2 clips of 9 frames (frames 0-8 and 9-17), each resized to the 64x96 bucket.
SMALL = ["decode.clip_frames=9", "decode.max_clips=2", "decode.buckets=[[64,96]]", "decode.min_short_side=32"]
MEMBERS = {"rgb.mp4", "warped.mp4", "mask.npz", "disp.npz", "json"}


def _cfg(*overrides) -> ClipConfig:
    return load_config(ClipConfig, [], [*SMALL, *overrides])


def _inputs(*rows: tuple[str, str]) -> dict[str, np.ndarray]:
    """A decode input batch: one (uri, problem) per manifest row, all in shard 3."""
    return {"shard": np.array([3] * len(rows), object), "input_index": np.array(range(len(rows)), object),
            "uri": np.array([uri for uri, _ in rows], object), "problem": np.array([p for _, p in rows], object)}


def _row(batch, i) -> dict:
    return {k: v[i] for k, v in batch.items()}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A demo scene (mp4 + disparity sidecar), a corrupt .mp4 and a 5-frame scene (too short for a clip)."""
    folder = tmp_path_factory.mktemp("actor-videos")
    scene, _ = write_scene(demo_scene(width=192, height=128, num_frames=20, seed=0), folder / "scene.mp4", fps=24)
    short, _ = write_scene(demo_scene(width=192, height=128, num_frames=5, seed=1), folder / "short.mp4", fps=24)
    corrupt = folder / "corrupt.mp4"
    corrupt.write_bytes(b"\x00not a video" * 100)
    return {"scene": scene, "short": short, "corrupt": str(corrupt)}


@pytest.fixture(scope="module")
def decoded(videos):
    """decode_batch with the oracle backend on: the scene, the corrupt file, a manifest row naming no input,
    the too-short scene."""
    batch = _inputs((videos["scene"], ""), (videos["corrupt"], ""), ("", "empty path cell"), (videos["short"], ""))
    return decode_batch(batch, cfg=_cfg("depth.backend=oracle"))


def test_decode_batch_gives_one_pending_row_per_clip_with_the_decoded_frames(decoded, videos):
    assert set(decoded) == set(DECODE_COLUMNS)
    scene_rows = [i for i, uri in enumerate(decoded["uri"]) if uri == videos["scene"]]
    assert scene_rows == [0, 1]  # two clips of the first input, in clip order, before the next input's rows
    _, clips = decode_clips(Path(videos["scene"]).read_bytes(), _cfg().decode)  # the stage itself, in process
    for i in scene_rows:
        row = _row(decoded, i)
        assert (row["shard"], row["input_index"], row["clip_index"], row["clips"]) == (3, 0, i, 2)
        assert row["status"] == "pending" and row["reason"] is None and row["message"] is None
        frames, relative = unpack(row["frames"]), unpack(row["relative"])
        assert frames.shape == (9, 64, 96, 3) and frames.dtype == np.uint8
        assert np.array_equal(frames, clips[i].frames)  # exactly the stage's decode of that clip
        assert relative.shape == (9, 64, 96) and relative.dtype == np.float32 and np.isfinite(relative).all()
        meta = json.loads(row["clip_meta"])
        assert meta["indices"] == list(range(9 * i, 9 * i + 9)) and meta["bucket"] == [64, 96]
        assert (meta["probe"]["frames"], meta["probe"]["width"], meta["probe"]["height"]) == (20, 192, 128)
        assert set(json.loads(row["timings"])) == {"decode"}


def test_decode_batch_gives_one_row_with_the_reason_for_a_bad_input(decoded, videos):
    verdicts = {(str(decoded["uri"][i]), int(decoded["input_index"][i])):
                (decoded["status"][i], decoded["reason"][i], decoded["clip_index"][i], decoded["clips"][i],
                 decoded["frames"][i], decoded["relative"][i])
                for i in range(len(decoded["uri"])) if decoded["uri"][i] != videos["scene"]}
    assert verdicts == {(videos["corrupt"], 1): ("failed", "decode_failed", 0, 1, b"", b""),
                        ("", 2): ("failed", "invalid_uri", 0, 1, b"", b""),
                        (videos["short"], 3): ("rejected", "too_short", 0, 1, b"", b"")}
    bad_row = list(decoded["uri"]).index("")
    assert decoded["message"][bad_row] == "empty path cell" and decoded["problem"][bad_row] == "empty path cell"


def test_decode_batch_without_the_oracle_leaves_relative_empty(videos):
    out = decode_batch(_inputs((videos["scene"], "")), cfg=_cfg("depth.backend=depth-anything-v2"))
    assert list(out["status"]) == ["pending", "pending"] and list(out["relative"]) == [b"", b""]
    raw = decode_batch(_inputs((videos["scene"], "")), cfg=_cfg("depth.backend=oracle"), raw=True)
    assert list(raw["relative"]) == [b"", b""]  # raw mode: clean clips need no disparity at all


def test_depth_actor_fills_relative_of_pending_rows_and_leaves_failed_rows_untouched(videos, tiny_dav2):
    cfg = _cfg("depth.backend=depth-anything-v2", f"depth.weights={tiny_dav2}", "depth.input_size=56",
               "depth.batch_size=9")
    batch = decode_batch(_inputs((videos["scene"], ""), (videos["corrupt"], "")), cfg=cfg)
    assert list(batch["status"]) == ["pending", "pending", "failed"]
    out = DepthActor(cfg)(batch)
    assert set(out) == set(DECODE_COLUMNS)
    backend = load_backend(cfg.depth)  # the same tiny model, called on the frames directly
    for i in (0, 1):
        relative = unpack(out["relative"][i])
        assert relative.shape == (9, 64, 96) and relative.dtype == np.float32
        assert np.array_equal(relative, backend(unpack(batch["frames"][i])))  # this row's own frames
        assert out["status"][i] == "pending" and set(json.loads(out["timings"][i])) == {"decode", "depth"}
        assert all(out[k][i] == batch[k][i] for k in DECODE_COLUMNS if k not in ("relative", "timings", "placement"))
        assert json.loads(out["placement"][i]) == {"decode": "cpu", "depth": "cpu"}  # where each stage ran
    assert all(out[k][2] == batch[k][2] for k in DECODE_COLUMNS)  # the failed row passes through as it was


def test_pair_actor_turns_a_pending_row_into_a_kept_record_and_passes_bad_rows_through(decoded, videos):
    from dreamstereo.io.sample import make_key

    out = PairActor(_cfg("depth.backend=oracle"))(decoded)
    assert set(out) == set(PAIR_COLUMNS) and len(out["record"]) == len(decoded["uri"])
    records = [json.loads(r) for r in out["record"]]
    for i in (0, 1):  # the scene's clips: kept, with the sample's members
        record = records[i]
        assert record["key"] == make_key(videos["scene"], i) and record["source"] == videos["scene"]
        assert (record["status"], record["reason"], record["frames"], record["clip_index"]) == ("ok", None, 9, i)
        members = unpack_members(out["members"][i])
        assert set(members) == MEMBERS
        assert json.loads(members["json"])["key"] == record["key"]  # the sample names itself
        assert set(json.loads(out["timings"][i])) == {"decode", "pair"}
        assert record["placement"] == {"decode": "cpu", "pair": "cpu"}
    for i in (2, 3, 4):  # corrupt, no input, too short: their verdict, no members, nothing computed
        record = records[i]
        assert (record["status"], record["reason"]) == (decoded["status"][i], decoded["reason"][i])
        assert record["message"] == decoded["message"][i] and record["frames"] == 0 and record["scores"] == {}
        assert out["members"][i] == b"" and json.loads(out["timings"][i]) == json.loads(decoded["timings"][i])
        assert record["placement"] == {"decode": "cpu"}  # only the stage that ran


def test_write_batch_stages_the_members_of_kept_samples_and_records_their_part(decoded, tmp_path):
    from dreamstereo.io.storage import LocalStorage

    pairs = PairActor(_cfg("depth.backend=oracle"))(decoded)
    storage = LocalStorage(tmp_path / "out")
    out = write_batch(pairs, storage)
    assert set(out) == set(WRITE_COLUMNS) and list(out["input_index"]) == list(pairs["input_index"])
    records = [json.loads(r) for r in out["record"]]
    staged = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.tar"))
    assert staged == sorted(r["part"] for r in records[:2])  # one tar per kept sample, nothing else
    for i in (0, 1):
        key, members = records[i]["key"], unpack_members(pairs["members"][i])
        assert records[i]["part"].endswith(f"/000003/{key}.tar")  # staged under its shard
        with tarfile.open(tmp_path / "out" / records[i]["part"]) as tar:
            found = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert found == {f"{key}.{ext}": data for ext, data in members.items()}  # byte for byte
        assert "staging_error" not in records[i] and "write" in json.loads(out["timings"][i])
        assert records[i]["placement"] == {"decode": "cpu", "pair": "cpu", "write": "cpu"}
    for i in (2, 3, 4):  # nothing to stage: the record goes on unchanged
        assert records[i] == json.loads(pairs["record"][i]) and "write" not in json.loads(out["timings"][i])


def test_write_batch_on_an_unwritable_storage_records_the_staging_error(decoded, tmp_path):
    from dreamstereo.io.storage import LocalStorage

    pairs = PairActor(_cfg("depth.backend=oracle"))(decoded)
    (tmp_path / "a-file").write_text("not a folder")
    storage = LocalStorage(tmp_path / "a-file" / "out")  # every write under it fails (ENOTDIR, even for root)
    records = [json.loads(r) for r in write_batch(pairs, storage)["record"]]
    for i in (0, 1):
        assert "part" not in records[i]
        assert records[i]["staging_error"].startswith(f"cannot write '{tmp_path / 'a-file' / 'out'}/")
    assert all("staging_error" not in r and "part" not in r for r in records[2:])


def test_each_operator_writes_exactly_its_declared_columns_and_the_next_reads_a_subset(decoded, tmp_path):
    from dreamstereo.io.storage import LocalStorage
    from dreamstereo.pipeline.job import check_contract, graph_operators

    pairs = PairActor(_cfg("depth.backend=oracle"))(decoded)
    produced = {"decode": set(decoded), "pair": set(pairs), "write": set(write_batch(pairs, LocalStorage(tmp_path)))}
    declared = {name: (set(reads), set(writes)) for name, reads, writes in CONTRACT}
    for name, columns in produced.items():
        assert columns == declared[name][1], name
    assert declared["depth"][0] <= produced["decode"] and declared["depth"][1] == produced["decode"]
    assert declared["pair"][0] <= produced["decode"] and declared["write"][0] <= produced["pair"]
    assert declared["driver"][0] <= produced["write"]
    for model_depth, fused in ((False, False), (True, False), (True, True)):  # every graph the job builds
        check_contract(graph_operators(model_depth, fused))
    assert graph_operators(True, True) == ["decode", "depth+pair", "write", "driver"]
    with pytest.raises(RuntimeError, match=r"write reads \['members'"):
        check_contract(["decode", "write", "driver"])  # a graph without the pair operator


# ----------------------------------------------------------------------------------------------------
# resources.pair_placement=depth: the pair stage inside the depth actor, on its device.


def _model_cfg(weights: str) -> ClipConfig:
    return _cfg("depth.backend=depth-anything-v2", f"depth.weights={weights}", "depth.input_size=56",
                "depth.batch_size=9", "quality.mask_ratio=[0.0,1.0]")


def test_depth_pair_actor_makes_the_same_samples_as_depth_then_pair(videos, tiny_dav2):
    """On CPU, the two placements give the same records, the same json/mask/disparity bytes and the same
    videos up to H.264's own noise; each records where its stages ran."""
    from dreamstereo.io.sample import read_sample
    from dreamstereo.pipeline.actors import DepthPairActor

    cfg = _model_cfg(tiny_dav2)
    batch = decode_batch(_inputs((videos["scene"], ""), (videos["corrupt"], "")), cfg=cfg)
    apart = PairActor(cfg, depth_weights=tiny_dav2)(DepthActor(cfg)(batch))
    fused = DepthPairActor(cfg, depth_weights=tiny_dav2)(batch)
    declared = {name: set(writes) for name, _, writes in CONTRACT}
    assert set(fused) == set(apart) == declared["depth+pair"] == declared["pair"]
    assert [json.loads(t).keys() for t in fused["timings"]] == [json.loads(t).keys() for t in apart["timings"]]
    records_apart = [json.loads(r) for r in apart["record"]]
    records_fused = [json.loads(r) for r in fused["record"]]
    assert records_fused == records_apart  # keys, verdicts, scores, placement (all cpu here), worker
    assert [r["status"] for r in records_fused] == ["ok", "ok", "failed"]
    assert records_fused[0]["placement"] == {"decode": "cpu", "depth": "cpu", "pair": "cpu"}
    assert records_fused[2]["placement"] == {"decode": "cpu"} and fused["members"][2] == b""
    for i in (0, 1):
        a, b = unpack_members(apart["members"][i]), unpack_members(fused["members"][i])
        assert set(a) == set(b) == MEMBERS
        for name in ("json", "mask.npz", "disp.npz"):
            assert a[name] == b[name], name
        sample_a, sample_b = read_sample(a), read_sample(b)
        assert sample_a.mask.any()  # a real pair, with holes
        for name in ("clean", "warped"):
            diff = np.abs(getattr(sample_a, name).astype(int) - getattr(sample_b, name).astype(int))
            assert 10 * np.log10(255**2 / max(np.mean(diff**2), 1e-12)) > 35, name


def test_device_names_are_recorded_as_the_stage_used_them():
    from dreamstereo.pipeline.actors import device_name

    assert device_name("cpu") == "cpu" and device_name("cuda:1") == "cuda:1"


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_a_pair_on_cuda_matches_the_cpu_pair(videos):
    """make_pair with the device its caller chose: the same pair on the GPU as on the CPU, up to float
    rounding (a pixel's uint8 value by at most 1, a mask pixel on a threshold)."""
    from dreamstereo.stages.pairs import make_pair

    cfg = _cfg("depth.backend=oracle")
    row = _row(decode_batch(_inputs((videos["scene"], "")), cfg=cfg), 0)
    frames, disparity = unpack(row["frames"]), unpack(row["relative"]) * 12.0  # up to ~12 px of disparity
    cpu = make_pair(frames, disparity, "k", cfg.pairs)
    gpu = make_pair(frames, disparity, "k", cfg.pairs, device="cuda")
    assert gpu.warped.dtype == np.uint8 and gpu.mask.dtype == bool and np.array_equal(gpu.clean, cpu.clean)
    assert np.array_equal(gpu.disparity, cpu.disparity) and cpu.mask.any()
    assert np.mean(gpu.mask != cpu.mask) < 1e-3
    assert np.abs(gpu.warped.astype(int) - cpu.warped.astype(int)).max() <= 1
