"""Benchmark the clip stages one by one at 768x1280 (no Ray): decode, depth, PBDP pair, filter, encode.

Prints ms/frame per stage and each stage's share of the chain, measured in one run. Depth runs a toy
Depth Anything V2 (real architecture, random weights, compute only; its cost says nothing about the
real model). With CUDA available it also measures Depth Anything V2 Small at its published size with
random weights, frames/s at 768x1280 (``--full-depth`` runs that on the CPU too, slowly).

    python benchmarks/bench_stages.py [--frames 17] [--repeats 2] [--full-depth]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_ms, write_result  # noqa: E402

from dreamstereo.io import media  # noqa: E402
from dreamstereo.io.sample import encode_sample  # noqa: E402
from dreamstereo.scenes import demo_scene  # noqa: E402
from dreamstereo.stages.decode import DecodeConfig, decode_clips  # noqa: E402
from dreamstereo.stages.depth import DepthAnythingV2, align_scale_shift  # noqa: E402
from dreamstereo.stages.disparity import normalize_disparity  # noqa: E402
from dreamstereo.stages.pairs import PairConfig, make_pair  # noqa: E402
from dreamstereo.stages.quality import score_quality  # noqa: E402
from dreamstereo.toy_models import save_depth_anything_v2, save_depthcrafter  # noqa: E402

HEIGHT, WIDTH = 768, 1280


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--full-depth", action="store_true", help="also time DA-V2 Small on the CPU")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = machine()
    t = args.frames

    scene = demo_scene(width=WIDTH, height=HEIGHT, num_frames=t, seed=0)
    data = media.encode_video_bytes(scene.frames_uint8(), 24, crf=18)
    cfg = DecodeConfig(clip_frames=t, buckets=[[HEIGHT, WIDTH]])
    _, (clip,) = decode_clips(data, cfg)
    frames = clip.frames
    tmp = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    toy = DepthAnythingV2(save_depth_anything_v2(tmp / "dav2-toy"), input_size=518)
    relative = toy(frames)
    relative_px = normalize_disparity(scene.disparity, WIDTH, 0.05, 0.0)
    pair = make_pair(frames, relative_px, "bench", PairConfig())

    stages = {
        "decode": lambda: decode_clips(data, cfg),
        "depth (toy DA-V2, compute only)": lambda: toy(frames),
        "depth alignment": lambda: align_scale_shift(relative),
        "pbdp pair": lambda: make_pair(frames, relative_px, "bench", PairConfig()),
        "filter": lambda: score_quality(frames, relative, pair.mask),
        "encode sample": lambda: encode_sample(pair.clean, pair.warped, pair.mask, pair.disparity, {}, 24.0),
    }
    rows = {}
    for name, fn in stages.items():
        rows[name] = time_ms(fn, repeats=args.repeats)["median_ms"] / t
    total = sum(rows.values())
    print(f"clip stages at {HEIGHT}x{WIDTH}, {t} frames, 1 CPU thread; machine: {info}")
    for name, ms in rows.items():
        print(f"  {name:<34} {ms:8.2f} ms/frame   {100 * ms / total:5.1f}% of the chain")
    print(f"  {'total':<34} {total:8.2f} ms/frame   ({1000 / total:.1f} frames/s)")

    gpu = {}
    if torch.cuda.is_available() or args.full_depth:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        small = DepthAnythingV2(save_depth_anything_v2(tmp / "dav2-small", published_small=True), device=device,
                                input_size=518, batch_size=8)
        ms = time_ms(lambda: small(frames), repeats=args.repeats, device=device)["median_ms"] / t
        gpu["depth-anything-v2-small (random weights)"] = {"device": device, "ms_per_frame": ms,
                                                           "frames_per_s": 1000 / ms}
        print(f"  DA-V2 Small, random weights, {device}: {ms:.1f} ms/frame ({1000 / ms:.1f} frames/s)")
    if torch.cuda.is_available():  # about 2.5e9 parameters: GPU only
        from dreamstereo.stages.depthcrafter import DepthCrafter

        unet, base = save_depthcrafter(tmp / "depthcrafter", published_size=True)
        crafter = DepthCrafter(unet, base, device="cuda", steps=5, max_resolution=1280)
        crafter.unet.half()
        ms = time_ms(lambda: crafter(frames), repeats=args.repeats, device="cuda")["median_ms"] / t
        gpu["depthcrafter (random weights, 5 steps, fp16 UNet)"] = {"device": "cuda", "ms_per_frame": ms,
                                                                     "frames_per_s": 1000 / ms}
        print(f"  DepthCrafter, random weights, 5 steps, cuda: {ms:.1f} ms/frame ({1000 / ms:.1f} frames/s)")
    if not args.no_write:
        path = write_result("stages", {"machine": info, "height": HEIGHT, "width": WIDTH, "frames": t,
                                       "ms_per_frame": rows, "model_depth": gpu})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
