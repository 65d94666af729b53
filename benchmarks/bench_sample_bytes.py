"""Bytes written per training sample at 49 x 768 x 1280, member by member (for the capacity plan, issue 12).

Measures the members ``encode_sample`` writes today (two H.264 streams at crf 10, the bit-packed mask,
float16 disparity, json) for two clips, in one run:

* ``real``: the first 49 frames of a real 1280x720 video (``../shared/data/videos/01_dog.mp4`` by default),
  decoded to the 768x1280 bucket as the job does. No depth comes with it, so its disparity is a PROXY: the
  grey level blurred (Gaussian, sigma 8 px), which has the scene's object edges; a depth model's output is
  smoother inside objects, so ``disp.npz`` here errs on the large side;
* ``synthetic``: the rendered demo scene with its exact (piecewise smooth) disparity: the small side.

Disparity is scaled to 5% of the width (the middle of ``disparity.max_disparity``). Also prints the
encode time per frame (one thread) as a cross-check of the stage table.

    python benchmarks/bench_sample_bytes.py [--video PATH] [--frames 49]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

from dreamstereo.io.sample import encode_sample  # noqa: E402
from dreamstereo.scenes import demo_scene  # noqa: E402
from dreamstereo.stages.decode import DecodeConfig, decode_clips  # noqa: E402
from dreamstereo.stages.disparity import normalize_disparity  # noqa: E402
from dreamstereo.stages.pairs import PairConfig, make_pair  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DREAMSTEREO_SHARED_DATA", REPO.parent / "shared" / "data"))
HEIGHT, WIDTH = 768, 1280


def measure(frames: np.ndarray, relative: np.ndarray) -> dict:
    disparity = normalize_disparity(relative, WIDTH, 0.05, 0.0)
    pair = make_pair(frames, disparity, "bytes", PairConfig())
    start = time.perf_counter()
    members = encode_sample(pair.clean, pair.warped, pair.mask, pair.disparity, {"key": "bytes"}, 24.0)
    seconds = time.perf_counter() - start
    sizes = {name: len(data) for name, data in members.items()}
    return {"frames": int(frames.shape[0]), "bytes": sizes, "total_bytes": sum(sizes.values()),
            "mask_ratio": float(pair.mask.mean()), "encode_ms_per_frame": 1000 * seconds / frames.shape[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path, default=SHARED / "videos" / "01_dog.mp4")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    info = machine()
    results = {}
    if args.video.is_file():
        cfg = DecodeConfig(clip_frames=args.frames, buckets=[[HEIGHT, WIDTH]], max_clips=1)
        _, clips = decode_clips(args.video.read_bytes(), cfg)
        frames = clips[0].frames
        grey = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(np.float32)
        proxy = np.stack([cv2.GaussianBlur(g, (0, 0), 8) for g in grey]) + 1.0
        results["real"] = {"source": args.video.name, **measure(frames, proxy)}
    else:
        print(f"{args.video} not found: the real clip is skipped")
    scene = demo_scene(width=WIDTH, height=HEIGHT, num_frames=args.frames, seed=0)
    results["synthetic"] = {"source": "demo_scene(seed=0)", **measure(scene.frames_uint8(), scene.disparity)}
    print(f"bytes per sample, {args.frames} x {HEIGHT} x {WIDTH}; machine: {info}")
    for name, r in results.items():
        members = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in r["bytes"].items())
        print(f"  {name:<10} {r['total_bytes'] / 1e6:7.2f} MB ({members}); mask {r['mask_ratio']:.3f}; "
              f"encode {r['encode_ms_per_frame']:.1f} ms/frame")
    if not args.no_write:
        print(f"wrote {write_result('sample-bytes', {'machine': info, 'height': HEIGHT, 'width': WIDTH, **results})}")


if __name__ == "__main__":
    main()
