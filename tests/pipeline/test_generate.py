"""`dreamstereo generate` end to end on a real local Ray: shards, accounting, resume, S3."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from dreamstereo.cli import main
from dreamstereo.io.sample import read_sample
from dreamstereo.io.shards import shard_name
from dreamstereo.io.storage import LocalStorage, S3Config, S3Storage
from dreamstereo.scenes import demo_scene, write_scene
from tests.conftest import deadline

pytestmark = pytest.mark.slow

SMALL = ["process.depth.backend=oracle", "process.decode.clip_frames=9", "process.decode.max_clips=2",
         "process.decode.buckets=[[64,96]]", "process.decode.min_short_side=32", "shard_size=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Five synthetic scene videos with disparity sidecars, and one corrupt file."""
    folder = tmp_path_factory.mktemp("corpus")
    for seed in range(5):
        write_scene(demo_scene(width=192, height=128, num_frames=20, seed=seed), folder / f"scene{seed}.mp4", fps=24)
    (folder / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    return folder


def _run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr()


def _read_all(storage):
    import webdataset as wds

    manifest = json.loads(storage.read_bytes("manifest.json"))
    samples, rows = {}, []
    for entry in manifest["shards"]:
        for sample in wds.WebDataset(_tar_url(storage, entry["path"]), shardshuffle=False, empty_check=False):
            samples[sample["__key__"]] = sample
        rows += pq.read_table(io.BytesIO(storage.read_bytes(shard_name(entry["shard"], "parquet")))).to_pylist()
    return manifest, samples, rows


def _tar_url(storage, key):
    if isinstance(storage, LocalStorage):
        return str(storage.root / key)
    return f"s3://{storage.bucket}/{storage.prefix}/{key}"


def test_local_run_accounts_for_every_input_and_resumes(capsys, ray_session, corpus, tmp_path):
    out = tmp_path / "out"
    code, captured = _run(capsys, "generate", "--input", str(corpus), "--output", str(out), *SMALL,
                          "progress_every_s=0.001")
    assert code == 0, captured.err
    assert "clips/s per worker: decode" in captured.out  # the periodic per-stage line
    storage = LocalStorage(out)
    manifest, samples, rows = _read_all(storage)
    summary = manifest["summary"]
    assert summary["inputs"] == 6 and summary["committed_shards"] == 3 and not summary["failed_shards"]
    assert set(summary["stage_clips_per_s"]) == {"decode", "pair", "write"}
    assert "clips/s" in captured.out and "frames/s; ETA" in captured.out
    assert storage.list("_staging/") == []  # staged samples were assembled into shards and removed
    assert not (out / "_staging").exists()  # and no empty staging folders are left behind (issue 13, item 5)
    assert {r["source"] for r in rows} == {str(p) for p in corpus.glob("*.mp4")}  # every input has a row
    assert sum(r["status"] == "ok" for r in rows) == len(samples) == summary["samples"] > 0
    broken = [r for r in rows if r["source"].endswith("broken.mp4")]
    assert [(r["status"], r["reason"]) for r in broken] == [("failed", "decode_failed")]
    assert sum(e["num_samples"] for e in manifest["shards"]) == len(samples)
    sample = read_sample(next(iter(samples.values())))
    assert sample.mask.shape == (9, 64, 96) and sample.meta["depth_backend"] == "oracle"
    assert "secret" not in storage.read_bytes("_run_config.yaml").decode().lower()

    # Crash simulation: shard 1 lost its stats (commit marker) and has a half-written tar.
    (out / "shards" / "000001_stats.json").unlink()
    (out / "shards" / "000001.tar").write_bytes(b"partial")
    storage.write_bytes("_staging/000000/stale.tar", b"left by a crash after shard 0 committed")
    code, captured = _run(capsys, "generate", "--input", str(corpus), "--output", str(out), *SMALL)
    assert code == 0 and "2 already committed, 1 to do" in captured.out
    manifest2, samples2, rows2 = _read_all(storage)
    assert sorted(samples2) == sorted(samples)  # same keys, nothing duplicated, nothing lost
    assert len(rows2) == len(rows) and len({r["key"] for r in rows2}) == len(rows2)
    assert storage.list("_staging/") == []
    same_key = next(k for k in samples)
    assert np.array_equal(read_sample(samples2[same_key]).mask, read_sample(samples[same_key]).mask)


def test_ray_data_reads_the_shards(ray_session, corpus, tmp_path, capsys):
    import ray

    out = tmp_path / "out"
    assert _run(capsys, "generate", "--input", str(corpus / "scene*.mp4"), "--output", str(out), *SMALL)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    ds = ray.data.read_webdataset([str(out / e["path"]) for e in manifest["shards"]], decoder=None)
    assert ds.count() == manifest["summary"]["samples"]


def test_s3_output_matches_local(ray_session, corpus, tmp_path, capsys, s3_bucket, s3_env):
    from dreamstereo.io.storage import register_webdataset_s3

    uri = f"s3://{s3_bucket}/run"
    code, captured = _run(capsys, "generate", "--input", str(corpus), "--output", uri, *SMALL,
                          f"s3.endpoint_url={s3_env}")
    assert code == 0, captured.err
    register_webdataset_s3(S3Config(endpoint_url=s3_env))
    storage = S3Storage(uri, S3Config(endpoint_url=s3_env))
    _, samples, rows = _read_all(storage)
    local = tmp_path / "local"
    _run(capsys, "generate", "--input", str(corpus), "--output", str(local), *SMALL)
    _, local_samples, _ = _read_all(LocalStorage(local))
    assert sorted(samples) == sorted(local_samples)
    def members(found):
        return {k: sorted(m for m in v if not m.startswith("__")) for k, v in found.items()}

    assert members(samples) == members(local_samples)
    assert all(samples[k]["mask.npz"] == local_samples[k]["mask.npz"] for k in samples)
    for key in storage.list():
        assert "SECRET" not in storage.read_bytes(key).decode("latin-1")


def test_unreachable_output_fails_fast(ray_session, corpus, capsys):
    code, captured = _run(capsys, "generate", "--input", str(corpus), "--output", "s3://b/x", *SMALL,
                          "s3.endpoint_url=http://127.0.0.1:1", "s3.max_attempts=1", "s3.connect_timeout_s=1")
    assert code == 2 and "unreachable" in captured.err and len(captured.err.strip().splitlines()) == 1


def test_raw_mode_writes_clean_clips_only(capsys, ray_session, corpus, tmp_path):
    out = tmp_path / "raw"
    code, captured = _run(capsys, "generate", "--input", str(corpus), "--output", str(out), *SMALL, "mode=raw")
    assert code == 0, captured.err
    _, samples, rows = _read_all(LocalStorage(out))
    assert samples and all(sorted(m for m in s if not m.startswith("__")) == ["json", "rgb.mp4"]
                           for s in samples.values())
    meta = json.loads(next(iter(samples.values()))["json"])
    assert "max_disparity" not in meta and meta["bucket"] == [64, 96]
    assert [(r["status"], r["reason"]) for r in rows if r["source"].endswith("broken.mp4")] == [
        ("failed", "decode_failed")]


def test_retry_failed_redoes_only_shards_with_retryable_failures(capsys, ray_session, corpus, tmp_path):
    import shutil

    late = tmp_path / "late.mp4"  # listed in the manifest, but not there yet: read_failed (retryable)
    manifest = tmp_path / "inputs.csv"
    names = sorted(p.name for p in corpus.glob("scene*.mp4"))[:3]
    manifest.write_text("video\n" + "".join(f"{corpus / n}\n" for n in names) + f"{late}\n")
    out = tmp_path / "out"
    assert _run(capsys, "generate", "--input", str(manifest), "--output", str(out), *SMALL)[0] == 0
    rows = {r["source"]: r for r in _read_all(LocalStorage(out))[2]}
    assert (rows[str(late)]["status"], rows[str(late)]["reason"]) == ("failed", "read_failed")
    shutil.copy(corpus / names[0], late)
    shutil.copy(corpus / names[0].replace(".mp4", ".disparity.npz"), tmp_path / "late.disparity.npz")
    code, captured = _run(capsys, "generate", "--input", str(manifest), "--output", str(out), *SMALL, "--retry-failed")
    assert code == 0 and "1 already committed, 1 to do" in captured.out
    _, samples, rows2 = _read_all(LocalStorage(out))
    late_rows = [r for r in rows2 if r["source"] == str(late)]
    assert late_rows and all(r["status"] == "ok" for r in late_rows)
    keys = [r["key"] for r in rows2]
    assert len(keys) == len(set(keys)) and len(samples) == sum(r["status"] == "ok" for r in rows2)


def test_resuming_with_other_inputs_or_shard_size_is_refused(capsys, ray_session, corpus, tmp_path):
    out = tmp_path / "out"
    assert _run(capsys, "generate", "--input", str(corpus), "--output", str(out), *SMALL)[0] == 0
    code, captured = _run(capsys, "generate", "--input", str(corpus), "--output", str(out), *SMALL[:-1],
                          "shard_size=3")
    assert code == 2 and "another input list, shard size or stage settings" in captured.err
    code, captured = _run(capsys, "generate", "--input", str(corpus / "scene*.mp4"), "--output", str(out), *SMALL)
    assert code == 2 and "new output" in captured.err



def test_wrong_credentials_fail_fast(s3_auth, s3_server, corpus, tmp_path, capsys, monkeypatch):
    bucket, _, secret = s3_auth
    cfg = S3Config(endpoint_url=s3_server)
    good = S3Storage(f"s3://{bucket}", cfg)
    good.check()  # the right key passes: what fails below fails because of the key
    video = next(corpus.glob("scene*.mp4"))
    good.write_bytes(f"in/{video.name}", video.read_bytes())
    endpoint = f"s3.endpoint_url={s3_server}"

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    code, captured = _run(capsys, "generate", "--input", str(corpus), "--output", f"s3://{bucket}/out", *SMALL,
                          endpoint)
    assert code == 2 and "access is denied" in captured.err and len(captured.err.strip().splitlines()) == 1
    (tmp_path / "list.csv").write_text(f"video\ns3://{bucket}/in/{video.name}\n")
    code, captured = _run(capsys, "generate", "--input", str(tmp_path / "list.csv"), "--output",
                          str(tmp_path / "out"), *SMALL, endpoint, "input.path_column=video")
    assert code == 2 and f"input 's3://{bucket}/in/{video.name}' cannot be read" in captured.err
    assert "access is denied" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "wrong-secret" not in captured.err + captured.out and secret not in captured.err + captured.out
    assert not any((tmp_path / "out").rglob("*"))  # failed before any work: nothing written

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    assert good.list() == [f"in/{video.name}"]  # nothing was written to the bucket either


def test_recycled_actors_lose_nothing(ray_session, corpus, tmp_path, capsys):
    """With recycle_after=1 the single pair actor replaces its process after every batch: each clip is
    made by another process, and the output holds the same samples as a run without recycling."""
    args = ["--input", str(corpus / "scene*.mp4"), *SMALL, "process.decode.max_clips=1"]
    assert _run(capsys, "generate", "--output", str(tmp_path / "plain"), *args)[0] == 0
    code, captured = _run(capsys, "generate", "--output", str(tmp_path / "recycled"), *args,
                          "resources.recycle_after=1")
    assert code == 0, captured.err
    _, plain, plain_rows = _read_all(LocalStorage(tmp_path / "plain"))
    _, recycled, rows = _read_all(LocalStorage(tmp_path / "recycled"))
    assert sorted(recycled) == sorted(plain) and len(rows) == len(plain_rows) >= 3
    assert len({r["worker"] for r in rows}) == len(rows)  # one process per batch
    assert len({r["worker"] for r in plain_rows}) == 1  # the same pool without recycling: one process


def test_hostile_inputs_and_sidecars_are_recorded_and_the_job_goes_on(capsys, ray_session, corpus, tmp_path):
    """One manifest with everything a web corpus throws at the job: damaged, odd and oversized sidecars,
    a FIFO, a device, a folder, rows that name no file. Every input is one recorded row with its reason,
    every shard commits, and a rerun with nothing to do leaves manifest.json as it was."""
    import shutil

    from tests.stages.test_depth import _npz

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    scenes = sorted(corpus.glob("scene*.mp4"))
    good = np.load(str(scenes[0]).replace(".mp4", ".disparity.npz"))["disparity"]
    sidecars = {
        "truncated": _npz(disparity=good)[:2000],
        "structured": _npz(disparity=np.zeros(good.shape, [("d", "f4"), ("c", "f4")])),
        "bomb": _npz(disparity=np.zeros((good.shape[0] * 16, *(4 * np.array(good.shape[1:]))), np.float32)),
        "npy_bytes": None,
    }
    for name, data in sidecars.items():
        shutil.copy(scenes[0], hostile / f"{name}.mp4")
        if data is None:
            np.save(open(hostile / f"{name}.disparity.npz", "wb"), good)
        else:
            (hostile / f"{name}.disparity.npz").write_bytes(data)
    os.mkfifo(hostile / "fifo.mp4")
    (hostile / "folder.mp4").mkdir()
    rows = [scenes[1], *(hostile / f"{n}.mp4" for n in sidecars), hostile / "fifo.mp4", "/dev/zero",
            hostile / "folder.mp4", "", "http://example.invalid/clip.mp4"]
    (tmp_path / "inputs.csv").write_text("video,n\n" + "".join(f"{r},{n}\n" for n, r in enumerate(rows)))
    out = tmp_path / "out"
    args = ["generate", "--input", str(tmp_path / "inputs.csv"), "--output", str(out), *SMALL[:-1], "shard_size=4",
            "process.decode.max_clips=1"]
    with deadline(240):
        code, captured = _run(capsys, *args)
    assert code == 0, captured.err
    manifest, samples, parquet = _read_all(LocalStorage(out))
    assert manifest["summary"]["committed_shards"] == 3 and not manifest["summary"]["failed_shards"]
    verdicts = {r["source"].rsplit("/", 1)[-1]: (r["status"], r["reason"]) for r in parquet}
    assert len(parquet) == len(rows) == manifest["summary"]["clips"]
    assert verdicts["truncated.mp4"] == verdicts["structured.mp4"] == ("failed", "depth_unreadable")
    assert verdicts["bomb.mp4"] == ("failed", "depth_mismatch")
    assert verdicts["npy_bytes.mp4"][0] in ("ok", "rejected") and verdicts[scenes[1].name][0] in ("ok", "rejected")
    assert verdicts["fifo.mp4"] == verdicts["zero"] == verdicts["folder.mp4"] == ("failed", "not_a_file")
    assert verdicts["inputs.csv#row=9"] == verdicts["inputs.csv#row=10"] == ("failed", "invalid_uri")
    assert samples and len(samples) == sum(r["status"] == "ok" for r in parquet)

    before = (out / "manifest.json").read_bytes()
    code, captured = _run(capsys, *args)
    assert code == 0 and "3 already committed, 0 to do" in captured.out
    assert (out / "manifest.json").read_bytes() == before  # the recorded run figures stay


def test_bad_input_lists_fail_before_the_output_exists(capsys, tmp_path):
    (tmp_path / "ragged.csv").write_text("video,score\na.mp4,1\nb.mp4,2,3\n")
    for source in (tmp_path / "ragged.csv", tmp_path / "missing.csv", tmp_path / "empty-folder"):
        code, captured = _run(capsys, "generate", "--input", str(source), "--output", str(tmp_path / "out"), *SMALL)
        assert code == 2 and len(captured.err.strip().splitlines()) == 1 and str(source) in captured.err
        assert not (tmp_path / "out").exists()


def test_a_full_disk_ends_with_one_line_and_a_rerun_equals_a_clean_run(capsys, ray_session, corpus, tmp_path,
                                                                       tiny_disk):
    import os
    import re
    import subprocess
    import sys

    args = ["--input", str(corpus / "scene[0-2].mp4"), *SMALL]
    clean = tmp_path / "clean"
    assert _run(capsys, "generate", "--output", str(clean), *args)[0] == 0
    out = tiny_disk.path / "out"
    tiny_disk.fill(leave=100 * 1024)  # room for about three staged samples, not for the whole output
    # The failing run is a real command (its own process and local Ray): its stderr is what a user sees.
    failed = subprocess.run([sys.executable, "-m", "dreamstereo.cli", "-q", "generate", "--output", str(out), *args],
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                            timeout=600)
    assert failed.returncode == 2, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"dreamstereo generate: error: cannot write '{re.escape(str(out))}/[^']+': "
                        rf"No space left on device \[ENOSPC\]", last), failed.stderr
    assert "Traceback" not in failed.stderr + failed.stdout
    files = tiny_disk.files()
    assert not [name for name in files if "/." in name], files  # no temp files
    for name in files:  # no half-written shard: a tar or parquet only beside its commit marker
        if name.endswith((".tar", ".parquet")) and "/shards/" in name:
            assert f"{name.rsplit('.', 1)[0]}_stats.json" in files, files
    tiny_disk.free()
    code, captured = _run(capsys, "generate", "--output", str(out), *args)
    assert code == 0, captured.err
    manifest, samples, rows = _read_all(LocalStorage(out))
    clean_manifest, clean_samples, clean_rows = _read_all(LocalStorage(clean))
    assert manifest["summary"]["committed_shards"] == clean_manifest["summary"]["committed_shards"] == 2
    assert sorted(samples) == sorted(clean_samples) and len(samples) == 6
    for key, sample in samples.items():
        members = {m for m in sample if not m.startswith("__")}
        assert members == {m for m in clean_samples[key] if not m.startswith("__")}
        assert all(sample[m] == clean_samples[key][m] for m in ("json", "mask.npz", "disp.npz")), key
        # rgb.mp4 and warped.mp4 are not byte-reproducible, not even between two clean runs (H.264 encodes
        # in the Ray workers differ slightly, ~1 level on average): compared decoded, within that noise.
        again, first = read_sample(sample), read_sample(clean_samples[key])
        for name in ("clean", "warped"):
            assert np.abs(getattr(again, name).astype(np.int16) - getattr(first, name)).mean() < 3.0, (key, name)
    def verdicts(found):
        return sorted((r["key"], r["status"], r["reason"]) for r in found)

    assert verdicts(rows) == verdicts(clean_rows)
    assert LocalStorage(out).list("_staging/") == []


def test_a_commit_on_a_full_disk_fails_once_and_the_driver_gets_its_storage_error(ray_session, tiny_disk):
    import os
    import time

    import ray

    from dreamstereo.io.shards import stage_sample
    from dreamstereo.io.storage import UnwritableStorageError
    from dreamstereo.pipeline.job import commit_shard, storage_error

    out = tiny_disk.path / "out"
    part = stage_sample(LocalStorage(out), 0, "a-00000000-c000", {"bin": os.urandom(400 * 1024)})
    records = [{"key": "a-00000000-c000", "source": "a.mp4", "input_index": 0, "clip_index": 0, "status": "ok",
                "reason": None, "scores": {}, "part": part}]
    tiny_disk.fill(leave=200 * 1024)  # the shard tar (400 KB) cannot be written
    start = time.monotonic()
    with pytest.raises(Exception) as info:  # 6 attempts would back off 2 + 4 + 8 + 10 + 10 s: none is made
        ray.get(ray.remote(commit_shard).options(max_retries=3).remote(str(out), S3Config(), 0, records, {}, "h", 6))
    assert time.monotonic() - start < 20
    error = storage_error(info.value)
    assert type(error) is UnwritableStorageError
    assert str(error) == f"cannot write {str(out / 'shards' / '000000.tar')!r}: No space left on device [ENOSPC]"
    assert storage_error(RuntimeError("a bug")) is None
    assert [n for n in tiny_disk.files() if "/shards/" in n or "/." in n] == []


def test_pairs_on_the_depth_actor_give_the_same_shards_as_pairs_on_cpu_actors(capsys, ray_session, corpus, tmp_path,
                                                                              tiny_dav2):
    """resources.pair_placement=depth (the pair stage inside the depth actors) against the default CPU pair
    pool, with a real (tiny) depth model: the same records and the same json/mask/disparity bytes (videos up
    to H.264's own noise), and the manifest says where each stage ran."""
    args = ["--input", str(corpus / "scene[01].mp4"), *SMALL, "process.depth.backend=depth-anything-v2",
            f"process.depth.weights={tiny_dav2}", "process.depth.input_size=56", "process.depth.batch_size=9",
            "process.quality.mask_ratio=[0.0,1.0]", "process.decode.max_clips=1"]
    runs = {}
    for placement in ("cpu", "depth"):
        code, captured = _run(capsys, "generate", "--output", str(tmp_path / placement), *args,
                              f"resources.pair_placement={placement}")
        assert code == 0, captured.err
        runs[placement] = _read_all(LocalStorage(tmp_path / placement))
    (m_cpu, s_cpu, r_cpu), (m_dep, s_dep, r_dep) = runs["cpu"], runs["depth"]

    def rows(found):
        return sorted(({k: v for k, v in r.items() if k != "worker"} for r in found), key=lambda r: r["key"])

    assert rows(r_dep) == rows(r_cpu) and len(r_cpu) == 2 and sorted(s_dep) == sorted(s_cpu) and len(s_cpu) == 2
    for key in s_cpu:
        for name in ("json", "mask.npz", "disp.npz"):
            assert s_dep[key][name] == s_cpu[key][name], name
        a, b = read_sample(s_dep[key]), read_sample(s_cpu[key])
        for name in ("clean", "warped"):
            diff = np.abs(getattr(a, name).astype(int) - getattr(b, name).astype(int))
            assert 10 * np.log10(255**2 / max(np.mean(diff**2), 1e-12)) > 35, name
    expected = {"decode": {"cpu": 2}, "depth": {"cpu": 2}, "pair": {"cpu": 2}, "write": {"cpu": 2}}
    assert m_dep["summary"]["stage_placement"] == m_cpu["summary"]["stage_placement"] == expected
    stats = json.loads((tmp_path / "depth" / "shards" / "000000_stats.json").read_text())
    assert stats["stage_placement"] == expected  # shard 0 holds both inputs (shard_size=2)
    assert all(json.loads(r["placement"]) == {"decode": "cpu", "depth": "cpu", "pair": "cpu", "write": "cpu"}
               for r in r_dep)


def test_depth_weights_toy_runs_on_the_workers_and_every_output_says_it_is_a_smoke_test(capsys, ray_session, corpus,
                                                                                      tmp_path):
    from dreamstereo.toy_models import SMOKE_TEST

    out = tmp_path / "toy"
    code, captured = _run(capsys, "generate", "--input", str(corpus / "scene[0].mp4"), "--output", str(out), *SMALL,
                          "process.depth.backend=depth-anything-v2", "process.depth.weights=toy",
                          "process.depth.input_size=56", "process.quality.mask_ratio=[0.0,1.0]",
                          "process.decode.max_clips=1")
    assert code == 0, captured.err
    manifest, samples, rows = _read_all(LocalStorage(out))
    assert manifest["summary"]["smoke_test"] == SMOKE_TEST and manifest["summary"]["samples"] == 1
    assert (out / "_run_config.yaml").read_text().startswith(f"# {SMOKE_TEST}")
    assert json.loads(next(iter(samples.values()))["json"])["depth_weights"] == "toy"
    assert [r["status"] for r in rows] == ["ok"]
    # The oracle touches no model: the same run with it says nothing of the kind.
    code, _ = _run(capsys, "generate", "--input", str(corpus / "scene[0].mp4"), "--output", str(tmp_path / "oracle"),
                   *SMALL, "process.depth.weights=toy", "process.decode.max_clips=1")
    assert code == 0 and "smoke_test" not in json.loads((tmp_path / "oracle" / "manifest.json").read_text())["summary"]
