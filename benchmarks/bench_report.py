"""Peak memory (RSS) and seconds of ``dreamstereo report`` over a synthetic output of many shards (issue 13, item 3).

A synthetic ``generate`` output is written with the real file formats: per shard a parquet of ``--rows`` rows with
:data:`dreamstereo.io.shards.PARQUET_SCHEMA` (random scores, statuses and reasons) and a stats file, a
``manifest.json`` summed from the stats by the job's own ``write_manifest``, and ``_run_config.yaml``. Only the
first ``--tar-shards`` shards hold kept clips, each with a real sample (``encode_sample``, 9 x 64 x 96) in a real
tar; the others hold rejected and failed clips (no sample, so no tar to read), which keeps the output small on
disk while the report reads every parquet and stats file. The report runs in a fresh process for a baseline of
``--baseline`` shards and for ``--shards`` shards; peak RSS comes from ``wait4``.

    python benchmarks/bench_report.py [--shards 10000] [--baseline 100] [--rows 16]

Writes ``benchmarks/results/<date>_cpu_report.json`` (unless ``--no-write``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REJECTS = ["static", "scene_cut", "mask_ratio_low", "mask_ratio_high", "degenerate_depth"]
FAILS = ["decode_failed", "depth_missing", "no_video_stream"]


def _scores(rng: np.random.Generator) -> dict:
    return {"frames": 49, "short_side": 768, "mask_ratio": float(rng.beta(2, 20)), "disparity_finite": True,
            "disparity_range": float(rng.uniform(0.2, 1.0)), "max_cut_score": float(rng.gamma(2, 0.08)),
            "motion": float(rng.gamma(2, 2.0)), "contrast": float(rng.normal(40, 10))}


def _record(shard: int, row: int, status: str, rng: np.random.Generator) -> dict:
    source = f"s3://corpus/videos/{shard:06d}/clip-{row:03d}.mp4"
    record = {"key": f"clip-{shard:06d}-{row:03d}-c000", "source": source, "input_index": row, "clip_index": 0,
              "status": status, "reason": None, "message": None, "frames": 49, "worker": "bench:1",
              "scores": _scores(rng), "placement": {"decode": "cpu", "depth": "cuda:0", "pair": "cuda:0"}}
    if status == "rejected":
        record["reason"] = REJECTS[int(rng.integers(len(REJECTS)))]
    elif status == "failed":
        record.update(reason=FAILS[int(rng.integers(len(FAILS)))], message="InvalidDataError: cannot decode",
                      scores={}, frames=0)
    return record


def build_output(folder: Path, shards: int, rows: int, tar_shards: int, seed: int = 0) -> Path:
    """A synthetic generate output of ``shards`` shards in ``folder``; returns it."""
    from dreamstereo.config import load_config, to_yaml
    from dreamstereo.io.sample import encode_sample
    from dreamstereo.io.shards import PARQUET_SCHEMA, ShardWriter, parquet_row, shard_name
    from dreamstereo.io.storage import LocalStorage
    from dreamstereo.pipeline.job import GenerateConfig, write_manifest
    from dreamstereo.scenes import demo_scene

    storage = LocalStorage(folder)
    cfg = load_config(GenerateConfig)
    storage.write_bytes("_run_config.yaml", to_yaml(cfg).encode())
    rng = np.random.default_rng(seed)
    scene = demo_scene(width=96, height=64, num_frames=9, seed=seed)
    clean = scene.frames_uint8()
    mask = scene.holes[next(iter(scene.holes))]
    members = encode_sample(clean, clean, mask, scene.disparity, {"direction": "left", "warp": {"method": "gapw"}},
                            12.0)
    timings = {"decode": 0.4, "depth": 1.5, "pair": 0.8, "write": 0.01}
    for shard in range(shards):
        if shard < tar_shards:  # kept clips with real samples, committed by the job's own writer
            writer = ShardWriter(storage, shard, config_hash="bench")
            for row in range(rows):
                status = "ok" if row % 2 == 0 else ("rejected" if row % 4 == 1 else "failed")
                record = _record(shard, row, status, rng)
                writer.add(record, members if status == "ok" else None)
            writer.commit({k: v * rows for k, v in timings.items()})
            continue
        records = [_record(shard, row, "rejected" if rng.random() < 0.8 else "failed", rng) for row in range(rows)]
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([parquet_row(r) for r in records], schema=PARQUET_SCHEMA), buffer)
        storage.write_bytes(shard_name(shard, "parquet"), buffer.getvalue())
        rejected = sum(r["status"] == "rejected" for r in records)
        reasons: dict[str, int] = {}
        for r in records:
            reasons[f"{r['status']}:{r['reason']}"] = reasons.get(f"{r['status']}:{r['reason']}", 0) + 1
        stats = {"shard": shard, "count": rows, "samples": 0, "ok": 0, "rejected": rejected, "failed": rows - rejected,
                 "reasons": dict(sorted(reasons.items())), "tar_bytes": 0, "tar_sha256": "",
                 "seconds_per_stage": {k: v * rows for k, v in timings.items()},
                 "stage_placement": {"decode": {"cpu": rows}}, "config_hash": "bench", "parquet_schema_version": 2}
        storage.write_bytes(shard_name(shard, "stats.json"), json.dumps(stats).encode())
    write_manifest(storage, [[None] * rows] * shards, cfg, 0.0, [])
    return folder


def run_report(dst: Path, out: Path) -> dict:
    """``dreamstereo report`` in a fresh process: its peak RSS (MB) and wall seconds."""
    code = "import sys; from dreamstereo.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "-q", "report", str(dst), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"report failed: {stderr[-2000:]}")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "seconds": round(seconds, 2), "index": stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--baseline", type=int, default=100)
    parser.add_argument("--rows", type=int, default=16, help="clips per shard (generate's shard_size default)")
    parser.add_argument("--tar-shards", type=int, default=4, help="shards with kept clips and a real tar")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    info = machine()
    print(f"dreamstereo report over synthetic outputs; machine: {info}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        for label, shards in (("baseline", args.baseline), ("large", args.shards)):
            start = time.perf_counter()
            dst = build_output(Path(tmp) / f"dst-{shards}", shards, args.rows, min(args.tar_shards, shards))
            built = time.perf_counter() - start
            size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
            result = run_report(dst, Path(tmp) / f"report-{shards}")
            page = Path(result.pop("index")).read_text()
            rows[label] = {"shards": shards, "clips": shards * args.rows, "output_mb": round(size / 2**20, 1),
                           "build_seconds": round(built, 1), **result, "page_kb": round(len(page) / 1024, 1)}
            print(f"  {label}: {rows[label]}")
    large, base = rows["large"], rows["baseline"]
    ratio = {"rss": round(large["peak_rss_mb"] / base["peak_rss_mb"], 2),
             "seconds": round(large["seconds"] / base["seconds"], 2),
             "shards": round(large["shards"] / base["shards"], 1)}
    print("\n| run | shards | clips | peak RSS (MB) | seconds |\n|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['shards']} | {r['clips']} | {r['peak_rss_mb']} | {r['seconds']} |")
    print(f"\n{ratio['shards']}x the shards: {ratio['rss']}x the peak RSS, {ratio['seconds']}x the seconds")
    if not args.no_write:
        print(f"wrote {write_result('report', {'machine': info, 'load_average_1m': os.getloadavg()[0], 'rows_per_shard': args.rows, 'tar_shards': args.tar_shards, 'results': rows, 'ratio': ratio})}")


if __name__ == "__main__":
    main()
