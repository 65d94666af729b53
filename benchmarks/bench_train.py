"""Benchmark one training step of the stereo inpainter (no data loading: synthetic batches in memory).

CPU: the toy Wan (``toy_models.wan_transformer_config``) and toy VAE on 9 x 64 x 64 clips, steps/s with and
without gradient checkpointing, and with the mask-weighted loss against the plain one, all in one run (so
the ratios are the reliable figures on a shared machine). With CUDA: the published Wan2.1-T2V-1.3B
transformer layout with random weights, set up as ``train()`` sets it up on a GPU: fp32 master weights, bf16
autocast (``precision=auto``), LoRA rank 32, gradient checkpointing, the optimizer of the run; 480 x 832 x 49
frames, batch 1: seconds per step and peak memory (the VAE is the published layout too, random weights,
fp32, as ``model.vae_bf16=false``).

    python benchmarks/bench_train.py [--steps 10] [--warmup 3] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_ms, write_result  # noqa: E402

from dreamstereo.models import wan_inpaint as wan  # noqa: E402
from dreamstereo.toy_models import save_toy_wan, wan_transformer_config, wan_vae_config  # noqa: E402
from dreamstereo.training.config import FlowConfig, TrainConfig  # noqa: E402
from dreamstereo.training.train import clip_grads, compute_loss, make_optimizer  # noqa: E402


def _batch(frames: int, height: int, width: int, batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 256, (batch, frames, height, width, 3), generator=g, dtype=torch.uint8)
    mask = torch.zeros(batch, frames, height, width, dtype=torch.bool)
    mask[:, :, :, width // 2: width // 2 + width // 8] = True  # a band like a disocclusion, 1/8 of the width
    return {"keys": ["bench"] * batch, "clean": clean, "cond": clean, "mask": mask}


def time_steps(transformer, vae, batch, prompt, cfg, device, autocast, *, steps: int, warmup: int) -> dict:
    """Seconds per optimizer step (median of ``steps`` after ``warmup``) and peak GPU memory."""
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(transformer, cfg)
    generator = torch.Generator().manual_seed(0)

    def step():
        loss = compute_loss(transformer, vae, batch, prompt, cfg, generator, device, autocast)
        loss.backward()
        clip_grads(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_ms(step, repeats=steps, warmup=warmup, device=device.type)["median_ms"] / 1000.0
    out = {"s_per_step": seconds, "steps_per_s": 1 / seconds}
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def cpu_figures(steps: int, warmup: int) -> dict:
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    base = save_toy_wan(tmp / "toy-wan", text_encoder=False)
    device = torch.device("cpu")
    vae = wan.load_vae(base)
    batch = _batch(9, 64, 64, 2)
    rows = {}
    for name, checkpointing, mask_weight in (("plain", False, 0.0), ("gradient checkpointing", True, 0.0),
                                             ("mask-weighted loss (x2)", False, 2.0)):
        torch.manual_seed(0)
        transformer = wan.load_inpaint_model(base)
        wan.add_lora(transformer, rank=8, alpha=8)
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        cfg = TrainConfig(flow=FlowConfig(mask_weight=mask_weight))
        prompt = torch.zeros(1, wan.TEXT_MAX_LEN, transformer.config.text_dim)
        rows[name] = time_steps(transformer, vae, batch, prompt, cfg, device, lambda: torch.autocast("cpu", enabled=False),
                                steps=steps, warmup=warmup)
    plain = rows["plain"]["s_per_step"]
    for row in rows.values():
        row["vs_plain"] = row["s_per_step"] / plain
    return {"setting": "toy Wan (2 layers, 2 heads of 48) + toy VAE, LoRA rank 8, batch 2 x 9 x 64 x 64, 1 thread",
            "rows": rows}


def gpu_figures(steps: int, warmup: int) -> dict:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    device = torch.device("cuda")
    torch.manual_seed(0)
    config = wan_transformer_config(published_size=True)
    transformer = WanTransformer3DModel(**config)  # fp32 master weights, as train() loads them
    wan.widen_patch_embedding(transformer)
    transformer = transformer.to(device)
    wan.add_lora(transformer, rank=32, alpha=32)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    vae = AutoencoderKLWan(**wan_vae_config(published_size=True)).to(device).eval().requires_grad_(False)
    batch = _batch(49, 480, 832, 1)
    prompt = torch.zeros(1, wan.TEXT_MAX_LEN, config["text_dim"], device=device)
    cfg = TrainConfig()
    result = time_steps(transformer, vae, batch, prompt, cfg, device,
                        lambda: torch.autocast("cuda", dtype=torch.bfloat16), steps=steps, warmup=warmup)
    params = sum(p.numel() for p in transformer.parameters())
    trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    return {"setting": "Wan2.1-T2V-1.3B layout, random fp32 weights + bf16 autocast (as train), LoRA rank 32, "
                       "gradient checkpointing, 480x832x49, batch 1, VAE encode included (fp32)",
            "parameters": params, "trainable_parameters": trainable, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gpu-steps", type=int, default=5)
    parser.add_argument("--no-cpu", action="store_true", help="skip the toy CPU figures")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    info = machine()
    payload = {"machine": info}
    print(f"machine: {info}")
    if not args.no_cpu:
        payload["cpu"] = cpu_figures(args.steps, args.warmup)
        print(f"CPU, {payload['cpu']['setting']}:")
        for name, row in payload["cpu"]["rows"].items():
            print(f"  {name:<26} {row['steps_per_s']:6.2f} steps/s  ({row['vs_plain']:.2f}x the time of plain)")
    if torch.cuda.is_available():
        payload["gpu"] = gpu_figures(args.gpu_steps, 2)
        g = payload["gpu"]
        print(f"GPU {info['gpu']}, {g['setting']}: {g['s_per_step']:.2f} s/step, peak {g['peak_memory_gb']:.1f} GB "
              f"({g['trainable_parameters'] / 1e6:.1f}M of {g['parameters'] / 1e9:.2f}B parameters train)")
    if not args.no_write:
        print(f"wrote {write_result('train', payload)}")


if __name__ == "__main__":
    main()
