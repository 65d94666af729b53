"""LPIPS (Zhang et al., CVPR 2018; v0.1 with AlexNet) from local weights only: nothing is downloaded.

Weights: a folder (or one file) holding torchvision's AlexNet state dict (``features.*``, e.g.
``alexnet-owt-7be5be79.pth``) and the LPIPS linear layers (``lin0.model.1.weight`` .. ``lin4...``, the
``lpips`` package's ``weights/v0.1/alex.pth``); ``.pth``/``.pt`` (tensors only) or ``.safetensors``.
Distance: unit-normalise each of the 5 ReLU feature maps over channels, square the difference, weight
channels with the linear layer, average over space, sum over layers (the package's ``spatial=False``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

ALEX_CHANNELS = (64, 192, 384, 256, 256)
ALEX_TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs in torchvision's alexnet.features whose outputs are used
SHIFT = (-0.030, -0.088, -0.188)  # LPIPS ScalingLayer, for inputs in [-1, 1]
SCALE = (0.458, 0.448, 0.450)


def alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` layer for layer (same state-dict keys), without torchvision."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class Lpips:
    """``Lpips(weights)(a, b)``: mean LPIPS distance of two ``(T, H, W, 3)`` uint8 clips (0 = identical)."""

    def __init__(self, weights: str | Path, device: str = "cpu"):
        path = Path(weights)
        files = sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pt", ".safetensors")) \
            if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"LPIPS weights {str(path)!r} not found: give a folder with torchvision's AlexNet "
                                    f"weights and the lpips package's weights/v0.1/alex.pth")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(_load_tensors(f))
        self.features = alexnet_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in ALEX_CHANNELS)
        wanted = [f"features.{k}" for k in self.features.state_dict()] + \
                 [f"lin{i}.model.1.weight" for i in range(len(ALEX_CHANNELS))]
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ValueError(f"LPIPS weights {str(path)!r} lack {missing[:3]}{'...' if len(missing) > 3 else ''} "
                             f"(need AlexNet features.* and lin0..lin4.model.1.weight)")
        self.features.load_state_dict({k[len("features."):]: state[k] for k in wanted[:-len(ALEX_CHANNELS)]})
        for i, lin in enumerate(self.lins):
            lin.weight.data.copy_(state[f"lin{i}.model.1.weight"])
        self.device = torch.device(device)
        self.features.to(self.device).eval()
        self.lins.to(self.device).eval()
        self.shift = torch.tensor(SHIFT, device=self.device).view(1, 3, 1, 1)
        self.scale = torch.tensor(SCALE, device=self.device).view(1, 3, 1, 1)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in ALEX_TAPS:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
            if index == ALEX_TAPS[-1]:
                break
        return out

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        if a.shape != b.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {a.shape} and {b.shape}")

        def prepare(x):
            t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            return (t - self.shift) / self.scale

        total = 0.0
        for fa, fb, lin in zip(self._taps(prepare(a)), self._taps(prepare(b)), self.lins):
            total = total + lin((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return float(total.mean())
