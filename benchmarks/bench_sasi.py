"""Benchmark SASI: dense vs sparse-token Wan DiT latency, at 25.6% retention and at real PBDP retentions.

The DiT is diffusers' ``WanTransformer3DModel`` with random weights (timing needs no trained weights):
- ``--preset cpu`` (default without CUDA): the full Wan2.1-1.3B width (1536 = 12 heads x 128, ffn 8960,
  text_dim 4096) with 2 blocks, on 17 frames of 256x384 pixels (5 x 16 x 24 = 1920 tokens), fp32;
- ``--preset full`` (default with CUDA): the full Wan2.1-1.3B (30 blocks), bf16 (norms, time embedder and
  modulation tables kept in fp32 as ``from_pretrained(torch_dtype=bfloat16)`` keeps them), on 81 frames
  of 768x1280 (21 x 48 x 80 = 80640 tokens).

Masks, with k = 3 token dilation (the paper's setting):
- ``25.6%``: a band of whole token columns per latent frame, 25.6% of the tokens (the paper's figure);
- ``synthetic``: PBDP ``mask1`` of the rendered demo scene at 768x1280 (9 frames, disparity up to 5% of
  the width), as training pairs make it (``training_direction()``);
- ``middlebury/<pair>``: PBDP ``mask1`` of each Middlebury 2005/2006 pair at its own size (one frame,
  ground-truth disparity: a wide baseline, up to ~15% of the width), and ``middlebury/<pair>@5%`` with the
  disparity scaled to at most 5% of the width, when ``../shared/data/middlebury-2005-2006`` is present.
Each PBDP token mask is computed at its own resolution and then resized (nearest) to the benchmark's token
grid, so the cost reflects the retention measured at that resolution; the JSON gives both retentions.

Reported: median ms per DiT forward (and per pixel frame), speed-up = dense / sparse in the same run, the
analytic FLOP ratio (matmuls and attention), and ``max_abs_diff_all_tokens``: sparse with every token kept
against dense. Top-level ``dense_ms``, ``sparse_ms``, ``retention``, ``speedup`` are those of the 25.6% row.

Token counts are padded to multiples of 32 (cpu) or 256 (full) tokens. On a shared CPU, ``--threads 1``
gives steadier timings (docs/benchmarks.md).

    python benchmarks/bench_sasi.py [--device cpu|cuda] [--preset cpu|full|tiny] [--layers N] [--threads N]
                                    [--repeats N] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

from dreamstereo.inference.sasi import SasiConfig, SparseWanTransformer, token_grid, token_mask  # noqa: E402
from dreamstereo.scenes import demo_scene  # noqa: E402
from dreamstereo.stages.warp import double_project, training_direction  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIDDLEBURY = Path(os.environ.get("DREAMSTEREO_SHARED_DATA", REPO.parent / "shared" / "data")) / "middlebury-2005-2006"
PAPER_RETENTION = 0.256  # tokens kept at k = 3 in the paper (mission.md)
K = 3
TEXT_LEN = 512  # Wan's umT5 context length

# Wan2.1-T2V-1.3B transformer config (Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json), except the
# input channels: 36 for the inpainter (noisy 16 | mask 4 | masked latent 16).
WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=36,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


@dataclasses.dataclass(frozen=True)
class Preset:
    layers: int
    frames: int  # pixel frames, 1 + 4n
    height: int  # pixels, multiple of 16
    width: int
    dtype: str
    bucket: int  # token counts padded to a multiple of this (about 0.3% of the grid at full size, 1.7% on CPU)
    repeats: int  # timed rounds after one warm-up round


PRESETS = {
    "cpu": Preset(layers=2, frames=17, height=256, width=384, dtype="float32", bucket=32, repeats=2),
    "full": Preset(layers=30, frames=81, height=768, width=1280, dtype="bfloat16", bucket=256, repeats=3),
    "tiny": Preset(layers=1, frames=5, height=64, width=96, dtype="float32", bucket=8, repeats=1),  # smoke test
}


def build_model(layers: int, dtype: torch.dtype, device: str):
    """Wan2.1-1.3B architecture with ``layers`` blocks and random weights, cast like ``from_pretrained``."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**WAN21_1_3B, "num_layers": layers}).eval().requires_grad_(False)
    model.to(device=device)
    if dtype != torch.float32:
        model.to(dtype=dtype)  # diffusers warns about its fp32 modules here; they are put back to fp32 below
    keep = set(WanTransformer3DModel._keep_in_fp32_modules)
    for name, module in model.named_modules():
        if name.split(".")[-1] in keep:
            module.float()
    for name, param in model.named_parameters():
        if name.split(".")[-1] in keep:
            param.data = param.data.float()
    return model


def interleaved_ms(runs: dict, *, repeats: int, device: str) -> dict:
    """Time every callable of ``runs`` once per round (one warm-up round, then ``repeats``); min / median ms."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    samples = {key: [] for key in runs}
    for round_ in range(repeats + 1):
        for key, fn in runs.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_ > 0:
                samples[key].append((time.perf_counter() - start) * 1000.0)
    return {key: {"min_ms": min(v), "median_ms": statistics.median(v)} for key, v in samples.items()}


def vae_times(preset: Preset, dtype: torch.dtype, device: str, repeats: int) -> dict:
    """Median ms of the Wan2.1 VAE (published configuration, random weights) encoding a clip of the preset's
    size and decoding its latent: the two VAE passes around one SASI step."""
    from diffusers import AutoencoderKLWan

    from dreamstereo.toy_models import wan_vae_config

    vae = AutoencoderKLWan(**wan_vae_config(published_size=True)).to(device, dtype).eval()
    video = torch.rand(1, 3, preset.frames, preset.height, preset.width, device=device, dtype=dtype) * 2 - 1
    with torch.inference_mode():
        latent = vae.encode(video).latent_dist.mode()
        times = interleaved_ms({"encode": lambda: vae.encode(video).latent_dist.mode(),
                                "decode": lambda: vae.decode(latent).sample}, repeats=repeats, device=device)
    return {"encode_ms": times["encode"]["median_ms"], "decode_ms": times["decode"]["median_ms"]}


def dit_flops(kept: int, total: int, layers: int) -> float:
    """Matmul + attention FLOPs of one DiT forward on ``kept`` of ``total`` tokens (Wan2.1-1.3B width)."""
    dim, ffn, c_in, patch = WAN21_1_3B["num_attention_heads"] * 128, WAN21_1_3B["ffn_dim"], 36, 4
    per_block = (8 * kept * dim * dim  # self-attention q, k, v, out
                 + 4 * kept * kept * dim  # QK^T and PV
                 + 4 * kept * dim * dim + 4 * TEXT_LEN * dim * dim  # cross-attention q, out; k, v of the text
                 + 4 * kept * TEXT_LEN * dim  # cross-attention scores and values
                 + 4 * kept * dim * ffn)  # feed-forward
    return layers * per_block + 2 * total * c_in * patch * dim + 2 * kept * dim * 16 * patch  # + embed all, head


def band_mask(grid: tuple[int, int, int], retention: float) -> torch.Tensor:
    """``(1, F, h, w)`` bool: per latent frame the first ``round(retention * h * w)`` tokens in column order."""
    f, h, w = grid
    per_frame = round(retention * h * w)
    order = torch.arange(h * w).reshape(w, h).t()  # column-major rank of each (row, column)
    return (order < per_frame)[None, None].expand(1, f, h, w).contiguous()


def resize_tokens(tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Nearest resize of a ``(1, F, h, w)`` token mask to ``grid``."""
    return F.interpolate(tokens[:, None].float(), size=grid, mode="nearest")[:, 0] > 0.5


def pbdp_masks() -> dict[str, torch.Tensor]:
    """PBDP ``mask1`` ``(1, T, H, W)`` bool of the synthetic scene and of each Middlebury pair."""
    masks = {}
    scene = demo_scene(width=1280, height=768, num_frames=9, seed=0)
    frames, disparity = scene.tensors()
    disparity = disparity * (0.05 * 1280 / float(disparity.max()))  # up to 5% of the width, as bench_warp
    mask1 = double_project(frames, disparity, training_direction()).mask1  # (T, H, W)
    masks["synthetic"] = mask1[None]
    if MIDDLEBURY.is_dir():
        from dreamstereo.warp_eval import fill_from_background, find_pairs, load_pair

        for folder in find_pairs(MIDDLEBURY):
            pair = load_pair(folder)
            filled = fill_from_background(pair.disparity_left, pair.disparity_left > 0)
            image = torch.from_numpy(pair.left).permute(2, 0, 1)[None].contiguous()  # (1, 3, H, W)
            disparity = torch.from_numpy(filled)[None]  # (1, H, W) px
            # As captured (a wide baseline: up to ~15% of the width), and with the disparity scaled to at most
            # 5% of the width (a narrower baseline, the middle of the paper's 2-8% training range).
            narrow = disparity * (0.05 * image.shape[-1] / float(disparity.max()))
            for label, scaled in [("", disparity), ("@5%", narrow)]:
                mask1 = double_project(image, scaled, training_direction()).mask1  # (1, H, W)
                masks[f"middlebury/{pair.name}{label}"] = mask1[None]
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: full on cuda, cpu on cpu")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's number of blocks")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="override the preset's dtype")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: the preset's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); on a shared VM 1 thread gives steadier timings")
    parser.add_argument("--bucket", type=int, default=None, help="pad token counts to a multiple of this "
                        "(default: the preset's)")
    parser.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the Wan2.1 VAE (published size, random weights): encode of the masked video "
                             "and decode, for end-to-end ms/frame (default: on with CUDA)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--no-write", action="store_true", help="write nothing under benchmarks/results")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    preset = PRESETS[args.preset or ("full" if args.device == "cuda" else "cpu")]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    layers = args.layers or preset.layers
    dtype_name = args.dtype or preset.dtype
    dtype = getattr(torch, dtype_name)
    device = args.device
    grid = token_grid(preset.frames, preset.height, preset.width)
    total = math.prod(grid)
    latent_shape = (1, 36, grid[0], 2 * grid[1], 2 * grid[2])
    info = machine()
    print(f"SASI DiT: Wan2.1-1.3B width, {layers} block(s), {dtype_name}, {preset.frames}x{preset.height}x"
          f"{preset.width} px -> token grid {grid} = {total} tokens, {device} ({torch.get_num_threads()} CPU threads); "
          f"machine: {info}")

    bucket = args.bucket or preset.bucket
    repeats = args.repeats or preset.repeats
    masks = {"25.6%": band_mask(grid, PAPER_RETENTION)}
    native = {"25.6%": PAPER_RETENTION}
    retention_by_k = {}  # at each mask's own resolution
    for name, pixel_mask in pbdp_masks().items():
        by_k = {k: token_mask(pixel_mask, k=k) for k in range(K + 1)}
        retention_by_k[name] = {k: result.retention for k, result in by_k.items()}
        native[name] = by_k[K].retention
        masks[name] = resize_tokens(by_k[K].tokens, grid)
        print(f"{name:<22} pixels {tuple(pixel_mask.shape[1:])}, hole fraction {float(pixel_mask.float().mean()):.3f}, "
              f"token retention at k = 0..{K}: " + ", ".join(f"{r:.3f}" for r in retention_by_k[name].values()))

    model = build_model(layers, dtype, device)
    sparse = SparseWanTransformer(model, SasiConfig(bucket_multiple=bucket))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(latent_shape, generator=g).to(device, dtype)
    timestep = torch.tensor([1000.0], device=device)
    text = torch.randn(1, TEXT_LEN, WAN21_1_3B["text_dim"], generator=g).to(device, dtype)
    fill = torch.zeros(1, 16, *latent_shape[2:], device=device, dtype=dtype)

    with torch.inference_mode():
        dense_out = model(x, timestep, text, return_dict=False)[0]
        all_out = sparse(x, timestep, text, torch.ones(1, *grid, dtype=torch.bool, device=device), fill)
        max_diff = float((all_out.float() - dense_out.float()).abs().max())
        scale = float(dense_out.float().abs().max())
        del dense_out, all_out

        # One timed forward per bucket size: rows with the same number of computed tokens run the same shapes
        # (only the gather index differs), so they share a timing. Dense and sparse runs are interleaved round
        # by round, so a busy machine slows both alike.
        masks = {name: tokens.to(device) for name, tokens in masks.items()}
        computed = {name: sparse.plan(tokens).index.shape[1] for name, tokens in masks.items()}
        runs = {"dense": lambda: model(x, timestep, text, return_dict=False)}
        timed_with = {}
        for name, tokens in masks.items():
            timed_with.setdefault(computed[name], name)
        for count, name in timed_with.items():
            runs[count] = (lambda t: lambda: sparse(x, timestep, text, t, fill))(masks[name])
        times = interleaved_ms(runs, repeats=repeats, device=device)
    dense = times["dense"]
    print(f"dense                  {dense['median_ms']:10.1f} ms ({dense['median_ms'] / preset.frames:8.2f} ms/frame, "
          f"min {dense['min_ms']:.1f})   max |sparse(all tokens) - dense| = {max_diff:.2e} (output max {scale:.2f})")
    rows = []
    for name, tokens in masks.items():
        kept, n = int(tokens.sum()), computed[name]
        timing = times[n]
        row = {"mask": name, "retention": kept / total, "retention_native": native[name],
               "tokens_kept": kept, "tokens_computed": n, "tokens_total": total, "timed_with": timed_with[n],
               "dense_ms": dense["median_ms"], "sparse_ms": timing["median_ms"],
               "dense_min_ms": dense["min_ms"], "sparse_min_ms": timing["min_ms"],
               "dense_ms_per_frame": dense["median_ms"] / preset.frames,
               "sparse_ms_per_frame": timing["median_ms"] / preset.frames,
               "speedup": dense["median_ms"] / timing["median_ms"],
               "speedup_min": dense["min_ms"] / timing["min_ms"],
               "flop_model_speedup": dit_flops(total, total, layers) / dit_flops(n, total, layers)}
        rows.append(row)
        print(f"{name:<22} retention {row['retention']:.3f} (native {native[name]:.3f}), {n:6d} computed: "
              f"{row['sparse_ms']:9.1f} ms ({row['sparse_ms_per_frame']:7.2f} ms/frame, min {row['sparse_min_ms']:.1f})"
              f"  {row['speedup']:5.2f}x (min/min {row['speedup_min']:5.2f}x, "
              f"FLOP model {row['flop_model_speedup']:5.2f}x)")

    head = rows[0]
    e2e = None
    if args.e2e if args.e2e is not None else device == "cuda":
        e2e = vae_times(preset, dtype, device, repeats)
        per_frame = (e2e["encode_ms"] + head["sparse_ms"] + e2e["decode_ms"]) / preset.frames
        e2e.update({"end_to_end_ms_per_frame": per_frame,
                    "end_to_end_dense_ms_per_frame": (e2e["encode_ms"] + dense["median_ms"] + e2e["decode_ms"])
                    / preset.frames})
        print(f"VAE (Wan2.1 size, random weights): encode {e2e['encode_ms']:.1f} ms, decode {e2e['decode_ms']:.1f} ms; "
              f"end to end at 25.6% (encode + sparse DiT with {layers} blocks + decode): {per_frame:.2f} ms/frame "
              f"(dense: {e2e['end_to_end_dense_ms_per_frame']:.2f})")
    payload = {
        "machine": info, "device": device, "preset": args.preset or ("full" if device == "cuda" else "cpu"),
        "layers": layers, "dtype": dtype_name, "pixels": [preset.frames, preset.height, preset.width],
        "token_grid": list(grid), "k": K, "bucket_multiple": bucket, "repeats": repeats,
        "cpu_threads": torch.get_num_threads(),
        "dense_ms": head["dense_ms"], "sparse_ms": head["sparse_ms"], "retention": head["retention"],
        "speedup": head["speedup"], "max_abs_diff_all_tokens": max_diff, "dense_output_max_abs": scale,
        # What the FLOP model predicts for the full model at 768x1280x81 (80640 tokens), 25.6% kept.
        "flop_model_speedup_full_size_25.6%": dit_flops(80640, 80640, 30)
        / dit_flops(round(PAPER_RETENTION * 80640), 80640, 30),
        "retention_by_k_native": retention_by_k,
        "vae": e2e,
        "rows": rows,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    if not args.no_write:
        print(f"wrote {write_result('sasi', payload)}")


if __name__ == "__main__":
    main()
