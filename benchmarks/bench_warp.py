"""Benchmark double projection (PBDP): GAPW against the two forward-splat baselines, in one run.

Measures milliseconds per frame of ``double_project`` at 768x1280 (8 frames by default) on one CPU
thread and on all cores, and on the GPU when CUDA is available; prints each method's ratio to the
soft splat measured in the same run. Input: a rendered synthetic scene (slanted planes, a moving
object) with disparity scaled to 5% of the width, the middle of the paper's range.

    python benchmarks/bench_warp.py [--height 768 --width 1280 --frames 8 --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_ms, write_result  # noqa: E402

from dreamstereo.scenes import demo_scene  # noqa: E402
from dreamstereo.stages.warp import double_project  # noqa: E402
from dreamstereo.types import WarpMethod  # noqa: E402

BASELINE = WarpMethod.SOFT_SPLAT


def make_inputs(height: int, width: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    scene = demo_scene(width=width, height=height, num_frames=frames, seed=0)
    rgb, disparity = scene.tensors()
    return rgb, disparity * (0.05 * width / float(disparity.max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only, write no JSON")
    args = parser.parse_args()

    frames, disparity = make_inputs(args.height, args.width, args.frames)
    settings = [("cpu", 1), ("cpu", os.cpu_count() or 1)]
    if torch.cuda.is_available():
        settings.append(("cuda", None))
    rows = []
    info = machine()
    print(f"double projection {args.frames}x{args.height}x{args.width}, machine: {info}")
    for device, threads in settings:
        if threads is not None:
            torch.set_num_threads(threads)
        f, d = frames.to(device), disparity.to(device)
        measured = {}
        for method in WarpMethod:
            timing = time_ms(lambda: double_project(f, d, "right", method=method), repeats=args.repeats,
                             device=device)
            measured[method] = {k: v / args.frames for k, v in timing.items()}  # per frame
        base = measured[BASELINE]["median_ms"]
        where = f"{device}" + (f", {threads} thread(s)" if threads else f" ({info.get('gpu')})")
        for method, t in measured.items():
            ratio = base / t["median_ms"]
            rows.append({"device": device, "threads": threads, "method": method.value,
                         "ms_per_frame_median": round(t["median_ms"], 3), "ms_per_frame_min": round(t["min_ms"], 3),
                         "speedup_vs_soft_splat": round(ratio, 3)})
            print(f"{where:<28} {method.value:<14} {t['median_ms']:9.2f} ms/frame (min {t['min_ms']:.2f})"
                  f"   {ratio:5.2f}x vs soft_splat")
    if not args.no_write:
        path = write_result("warp", {"machine": info, "shape": [args.frames, 3, args.height, args.width],
                                     "max_disparity_px": float(disparity.max()), "repeats": args.repeats,
                                     "rows": rows})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
