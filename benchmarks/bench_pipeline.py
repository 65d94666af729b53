"""Benchmark the generation job end to end against the same work done in one process.

In one run: (1) the per-clip chain (decode, oracle disparity, PBDP pair, filter, encode) in a plain loop
in this process, the baseline; (2) ``run_generate`` on a local Ray with one pair actor; (3) with two.
Prints clips/s, the overhead ratio (Ray with one worker vs the single-process loop; goal <= 1.15x) and
the scaling ratio (two workers vs one; goal >= 1.8x), and peak memory of this process.

    python benchmarks/bench_pipeline.py [--videos 8] [--frames 17] [--size 256x448]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

from dreamstereo.pipeline.actors import PairActor, decode_batch  # noqa: E402
from dreamstereo.pipeline.job import GenerateConfig, run_generate  # noqa: E402
from dreamstereo.scenes import demo_scene, write_scene  # noqa: E402
from dreamstereo.stages.depth import DepthBackendName  # noqa: E402


SHARD_SIZE = 2  # clips per shard (one clip per video)


def make_config(frames: int, height: int, width: int, pair_actors: int) -> GenerateConfig:
    cfg = GenerateConfig(shard_size=SHARD_SIZE)
    cfg.process.depth.backend = DepthBackendName.ORACLE
    cfg.process.decode.clip_frames = frames
    cfg.process.decode.max_clips = 1
    cfg.process.decode.buckets = [[height, width]]
    cfg.process.decode.min_short_side = min(height, width)
    cfg.resources.pair_actors = pair_actors
    cfg.resources.decode_num_cpus = 0.25
    cfg.resources.pair_num_cpus = 0.75
    return cfg


def single_process(videos: list[str], cfg: GenerateConfig) -> float:
    """Seconds for the same per-clip chain in a plain loop (no Ray, no shard writing), on one thread as
    one Ray worker gets."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    pair = PairActor(cfg.process)
    start = time.perf_counter()
    for k, uri in enumerate(videos):
        batch = {"shard": np.array([0], dtype=object), "input_index": np.array([k], dtype=object),
                 "uri": np.array([uri], dtype=object)}
        pair(decode_batch(batch, cfg=cfg.process))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", default="256x448")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    videos = []
    for seed in range(args.videos):
        scene = demo_scene(width=width, height=height, num_frames=args.frames, seed=seed)
        videos.append(write_scene(scene, tmp / "videos" / f"s{seed:03d}.mp4", fps=24)[0])

    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    baseline = single_process(videos, make_config(args.frames, height, width, 1))
    runs, steady = {}, {}
    for actors in (1, 2):
        commits = []  # when each shard committed: the rate between the first and the last is the steady state
        start = time.perf_counter()
        summary = run_generate(str(tmp / "videos"), str(tmp / f"out-{actors}"),
                               make_config(args.frames, height, width, actors),
                               echo=lambda line: commits.append(time.perf_counter()) if "committed (" in line else None)
        runs[actors] = time.perf_counter() - start
        steady[actors] = (len(commits) - 1) * SHARD_SIZE / (commits[-1] - commits[0])
        assert summary["samples"] + summary["rejected"] == args.videos, summary
    ray.shutdown()
    clips = args.videos
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = machine()
    print(f"pipeline on {clips} clips of {args.frames} frames at {height}x{width}; machine: {info}")
    print(f"  single process loop : {clips / baseline:6.2f} clips/s ({baseline:.1f} s)")
    for actors, seconds in runs.items():
        print(f"  Ray, {actors} pair actor(s): {clips / seconds:6.2f} clips/s ({seconds:.1f} s)")
    print(f"  overhead (Ray x1 / loop): {runs[1] / baseline:.2f}x   (goal <= 1.15x)")
    print(f"  scaling  (Ray x1 / Ray x2): {runs[1] / runs[2]:.2f}x   (goal >= 1.8x)")
    print(f"  steady state (first to last shard commit): x1 {steady[1]:.2f} clips/s, x2 {steady[2]:.2f} clips/s; "
          f"overhead {clips / baseline / steady[1]:.2f}x, scaling {steady[2] / steady[1]:.2f}x")
    print(f"  peak memory of the driver: {peak_mb:.0f} MB")
    if not args.no_write:
        path = write_result("pipeline", {"machine": info, "clips": clips, "frames": args.frames,
                                         "size": [height, width], "single_process_s": baseline,
                                         "ray_s": {str(k): v for k, v in runs.items()},
                                         "overhead": runs[1] / baseline, "scaling": runs[1] / runs[2],
                                         "steady_clips_per_s": {str(k): v for k, v in steady.items()},
                                         "steady_overhead": clips / baseline / steady[1],
                                         "steady_scaling": steady[2] / steady[1],
                                         "driver_peak_mb": peak_mb})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
