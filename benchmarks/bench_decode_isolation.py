"""Benchmark the cost of decoding in a child process (pipeline/isolate.py) against a direct decode_clips call.

Three inputs: a tiny synthetic video (16 frames, 64x96: the fixed cost of fork, pipe and reaping), a short
real video (``davis_dolphins.mp4`` from ../shared/data, one 49-frame clip at 480x832) and a synthetic
768x1280 video with 49 frames (one full-size clip: 144 MB of frames crossing the pipe). Minimum and median
of the repeats: on a shared machine the minimum is the better estimate of the cost itself.

    python benchmarks/bench_decode_isolation.py [--repeats 5] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_ms, write_result  # noqa: E402

from dreamstereo.io import media  # noqa: E402
from dreamstereo.pipeline.isolate import decode_contained  # noqa: E402
from dreamstereo.scenes import demo_scene  # noqa: E402
from dreamstereo.stages.decode import DecodeConfig, decode_clips  # noqa: E402

SHARED = Path(os.environ.get("DREAMSTEREO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    tiny = demo_scene(width=96, height=64, num_frames=16, seed=0)
    inputs = {"synthetic 96x64 -> 1x9x64x96": (media.encode_video_bytes(tiny.frames_uint8(), 24),
                                               DecodeConfig(clip_frames=9, buckets=[[64, 96]], min_short_side=32))}
    real = SHARED / "videos" / "davis_dolphins.mp4"
    if real.is_file():
        inputs["davis_dolphins 960x540 -> 1x49x480x832"] = (real.read_bytes(), DecodeConfig())
    else:
        print(f"skipping the real video: {real} not found")
    scene = demo_scene(width=1280, height=768, num_frames=49, seed=0)
    inputs["synthetic 1280x768 -> 1x49x768x1280"] = (media.encode_video_bytes(scene.frames_uint8(), 24, crf=18),
                                                      DecodeConfig(buckets=[[768, 1280]]))
    rows = {}
    print(f"decode_clips direct vs in a child process, median of {args.repeats}; machine: {machine()}")
    for name, (data, cfg) in inputs.items():
        direct = time_ms(lambda: decode_clips(data, cfg), repeats=args.repeats)
        contained = time_ms(lambda: decode_contained(data, cfg), repeats=args.repeats)
        rows[name] = {"bytes": len(data), **{f"direct_{k}": round(v, 1) for k, v in direct.items()},
                      **{f"contained_{k}": round(v, 1) for k, v in contained.items()},
                      "overhead_min_ms": round(contained["min_ms"] - direct["min_ms"], 1),
                      "ratio_min": round(contained["min_ms"] / direct["min_ms"], 3)}
        print(f"  {name:<36} direct min/median {direct['min_ms']:7.1f}/{direct['median_ms']:7.1f} ms   contained "
              f"{contained['min_ms']:7.1f}/{contained['median_ms']:7.1f} ms   overhead (min) "
              f"{contained['min_ms'] - direct['min_ms']:+7.1f} ms = {contained['min_ms'] / direct['min_ms']:.2f}x")
    if not args.no_write:
        print(write_result("decode-isolation", {"machine": machine(), "load_average_1m": os.getloadavg()[0],
                                                "repeats": args.repeats, "results": rows}))


if __name__ == "__main__":
    main()
