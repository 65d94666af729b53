"""Sample encoding alternatives at 768x1280 (issue 12, item 3): fidelity against CPU time and bytes.

On a real clip (``01_dog.mp4`` of the shared data, brought to the 768x1280 bucket; a rendered scene when the
shared data is absent) paired by the chain's own PBDP (a synthetic near-to-far disparity with a moving disk),
it encodes the sample's members every way listed and prints, per alternative: PSNR of the stored frames
against the originals (``inf`` = lossless; for the disparity, the largest error in pixels), CPU ms per frame
of encoding (``time.process_time``, so every thread the encoder starts is counted; the H.264 rows run x264
with one thread unless they say ``threads=auto``) and bytes per sample frame. The baseline is the format
before issue 12 (x264 ``medium`` crf 10 with x264's own threads, the packed mask and float16 disparity in
deflated npz), measured in the same run; every row gives its CPU time as a ratio of the baseline's.

    python benchmarks/bench_encode.py [--frames 17] [--repeats 1] [--video ../shared/data/videos/01_dog.mp4]

Writes ``benchmarks/results/<date>_cpu_encode.json`` (unless ``--no-write``).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import av
import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

from dreamstereo.io import media  # noqa: E402
from dreamstereo.stages.decode import DecodeConfig, decode_clips  # noqa: E402
from dreamstereo.stages.disparity import normalize_disparity  # noqa: E402
from dreamstereo.stages.pairs import PairConfig, make_pair  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = ROOT.parent / "shared" / "data" / "videos" / "01_dog.mp4"
HEIGHT, WIDTH = 768, 1280


def clip_frames(video: Path, frames: int) -> tuple[np.ndarray, str]:
    """``(T, 768, 1280, 3) uint8`` frames of the real clip (its first clip), or of a rendered scene."""
    cfg = DecodeConfig(clip_frames=frames, max_clips=1, buckets=[[HEIGHT, WIDTH]])
    if video.is_file():
        _, (clip,) = decode_clips(video.read_bytes(), cfg)
        return clip.frames, video.name
    from dreamstereo.scenes import demo_scene

    scene = demo_scene(width=WIDTH, height=HEIGHT, num_frames=frames, seed=0)
    _, (clip,) = decode_clips(media.encode_video_bytes(scene.frames_uint8(), 24, crf=18), cfg)
    return clip.frames, "rendered demo scene (shared data absent)"


def synthetic_disparity(t: int) -> np.ndarray:
    """Relative disparity: near at the bottom, far at the top, a disk crossing the frame (like bench_memory)."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    out = np.empty((t, HEIGHT, WIDTH), np.float32)
    for k in range(t):
        cx = WIDTH * (0.2 + 0.6 * k / max(t - 1, 1))
        out[k] = 0.2 + 0.5 * yy / HEIGHT + 0.3 * (((xx - cx) ** 2 + (yy - HEIGHT / 2) ** 2) < (HEIGHT / 4) ** 2)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def cpu_ms(fn, repeats: int):
    """(result, least CPU milliseconds over ``repeats`` calls) of ``fn()``."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        best = min(best, (time.process_time() - start) * 1000.0)
    return result, best


# ----------------------------------------------------------------------------- the alternatives


def h264(frames: np.ndarray, *, preset: str, crf: int, threads: str, fps: float = 24.0) -> bytes:
    """H.264 yuv420p mp4 (faststart) as the sample format writes it, with the given x264 settings."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.mp4"
        with av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"}) as out:
            stream = out.add_stream("libx264", rate=24)
            stream.pix_fmt, stream.height, stream.width = "yuv420p", frames.shape[1], frames.shape[2]
            stream.options = {"crf": str(crf), "preset": preset, **({} if threads == "auto" else {"threads": threads})}
            for frame in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            out.mux(stream.encode())
        return path.read_bytes()


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def npz_fast(name: str, array: np.ndarray) -> bytes:
    """One array in an npz deflated at zlib level 1 (``np.savez_compressed`` uses the default, 6)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive, \
            archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.ascontiguousarray(array))
    return buffer.getvalue()


def ffv1_gray(mask: np.ndarray) -> bytes:
    """The mask as a lossless FFV1 gray8 video in Matroska (0 / 255)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.mkv"
        with av.open(str(path), mode="w", format="matroska") as out:
            stream = out.add_stream("ffv1", rate=24)
            stream.pix_fmt, stream.height, stream.width = "gray", mask.shape[1], mask.shape[2]
            for frame in mask:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8) * 255, format="gray")))
            out.mux(stream.encode())
        return path.read_bytes()


def decode_gray(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])


def png_frames(mask: np.ndarray) -> list[bytes]:
    """One 1-bit-per-pixel-worthy PNG per frame (OpenCV writes 8-bit grey; PNG's filters do the packing)."""
    return [cv2.imencode(".png", m.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_COMPRESSION, 6])[1].tobytes()
            for m in mask]


def byte_shuffled_f16(disparity: np.ndarray) -> bytes:
    """float16 disparity with its high and low bytes stored as two planes before deflate (as Blosc's shuffle)."""
    raw = disparity.astype(np.float16).view(np.uint8).reshape(*disparity.shape, 2)
    return npz(planes=np.ascontiguousarray(np.moveaxis(raw, -1, 0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--presets", nargs="+", default=["veryfast", "faster", "medium"])
    parser.add_argument("--crfs", type=int, nargs="+", default=[10, 14, 18])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    info = machine()

    frames, clip_name = clip_frames(args.video, args.frames)
    t = len(frames)
    disparity_px = normalize_disparity(synthetic_disparity(t), WIDTH, 0.05, 0.0)
    pair = make_pair(frames, disparity_px, "bench-encode", PairConfig())
    views = {"rgb.mp4": pair.clean, "warped.mp4": pair.warped}
    rows = []

    def add(member: str, option: str, data_bytes: int, ms: float, fidelity: float, unit: str = "dB") -> None:
        rows.append({"member": member, "option": option, "bytes_per_frame": data_bytes / t, "cpu_ms_per_frame": ms / t,
                     "fidelity": fidelity, "fidelity_unit": unit})

    # 1. the two videos: the baseline (x264's own threads), then presets x crf on one thread
    settings = [("medium", 10, "auto")] + [(p, c, "1") for p in args.presets for c in args.crfs]
    for preset, crf, threads in settings:
        for member, view in views.items():
            data, ms = cpu_ms(lambda v=view, p=preset, c=crf, n=threads: h264(v, preset=p, crf=c, threads=n),
                              args.repeats)
            add(member, f"x264 {preset} crf {crf} threads={threads}", len(data), ms,
                psnr(media.decode_video_bytes(data), view))
    reproducible = h264(pair.warped, preset="faster", crf=10, threads="1") == h264(pair.warped, preset="faster",
                                                                                   crf=10, threads="1")
    threaded_same = h264(pair.warped, preset="medium", crf=10, threads="auto") == h264(
        pair.warped, preset="medium", crf=10, threads="auto")

    # 2. the mask (lossless every way; fidelity = exact or not)
    mask = pair.mask
    masks = {
        "npz deflate, bool (one byte per pixel)": (lambda: npz(mask=mask),
                                                   lambda b: np.load(io.BytesIO(b))["mask"]),
        "npz deflate, np.packbits (format v1)": (
            lambda: npz(bits=np.packbits(mask, axis=-1), shape=np.asarray(mask.shape, np.int64)),
            lambda b: np.unpackbits(np.load(io.BytesIO(b))["bits"], axis=-1, count=mask.shape[-1]).astype(bool)),
        "PNG per frame (level 6)": (lambda: png_frames(mask), None),
        "FFV1 gray8 (Matroska)": (lambda: ffv1_gray(mask), lambda b: decode_gray(b) > 127),
        "npz deflate level 1, np.packbits": (
            lambda: npz_fast("bits", np.packbits(mask, axis=-1)),
            lambda b: np.unpackbits(np.load(io.BytesIO(b))["bits"], axis=-1, count=mask.shape[-1]).astype(bool)),
    }
    for option, (encode, decode) in masks.items():
        data, ms = cpu_ms(encode, args.repeats)
        if isinstance(data, list):
            size = sum(map(len, data))
            back = np.stack([cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_GRAYSCALE) > 127 for p in data])
        else:
            size, back = len(data), decode(data)
        add("mask", option, size, ms, float("inf") if np.array_equal(back, mask) else float("nan"), "exact")

    # 3. the disparity (fidelity: the largest error in pixels)
    disp = pair.disparity
    options = {
        "npz deflate, float32": (lambda: npz(disparity=disp), 0.0),
        "npz deflate, float16 (format v1)": (lambda: npz(disparity=disp.astype(np.float16)),
                                             float(np.abs(disp.astype(np.float16).astype(np.float32) - disp).max())),
        "npz deflate level 1, float16": (lambda: npz_fast("disparity", disp.astype(np.float16)),
                                         float(np.abs(disp.astype(np.float16).astype(np.float32) - disp).max())),
        "npz deflate, float16, byte planes": (lambda: byte_shuffled_f16(disp),
                                              float(np.abs(disp.astype(np.float16).astype(np.float32) - disp).max())),
        "npz deflate, uint16 in 1/64 px": (lambda: npz(disparity=np.round(disp * 64).astype(np.uint16)),
                                           float(np.abs(np.round(disp * 64) / 64 - disp).max())),
    }
    for option, (encode, error) in options.items():
        data, ms = cpu_ms(encode, args.repeats)
        add("disp", option, len(data), ms, error, "max px error")

    base = {r["member"]: r for r in rows if r["option"] in ("x264 medium crf 10 threads=auto",
                                                            "npz deflate, np.packbits (format v1)",
                                                            "npz deflate, float16 (format v1)")}
    print(f"machine: {info['cpu']} ({info['cpu_count']} cores), one thread; clip: {clip_name}, {t} frames at "
          f"{HEIGHT}x{WIDTH}; baseline = format v1 (x264 medium crf 10, x264's own threads)")
    print("| member | option | fidelity | CPU ms/frame | x baseline | KB/frame |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fid = r["fidelity"]
        fid_text = (f"{fid:.2f} dB" if r["fidelity_unit"] == "dB" else
                    ("exact" if fid == float("inf") else "NOT exact") if r["fidelity_unit"] == "exact" else
                    f"{fid:.4f} px")
        ratio = r["cpu_ms_per_frame"] / max(base[r["member"]]["cpu_ms_per_frame"], 1e-9)
        r["cpu_ratio_vs_baseline"] = ratio
        print(f"| {r['member']} | {r['option']} | {fid_text} | {r['cpu_ms_per_frame']:.1f} | {ratio:.2f}x | "
              f"{r['bytes_per_frame'] / 1024:.1f} |")
    print(f"x264 threads=1 byte-reproducible run to run: {reproducible}; threads=auto: {threaded_same}")
    if not args.no_write:
        path = write_result("encode", {"machine": info, "clip": clip_name, "frames": t, "size": [HEIGHT, WIDTH],
                                       "rows": rows, "threads1_reproducible": reproducible,
                                       "threads_auto_reproducible": threaded_same})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
