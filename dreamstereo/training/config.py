"""``TrainConfig``: the schema of ``dreamstereo train`` (presets in ``configs/train/``)."""

from __future__ import annotations

import dataclasses
import enum
import math

from dreamstereo.models.wan_inpaint import LORA_TARGETS
from dreamstereo.training.data import DataConfig


@dataclasses.dataclass
class ModelConfig:
    """Which weights to start from."""

    base: str | None = None  # local diffusers-format Wan2.1-T2V-1.3B folder (or a 36-channel / exported one)
    init_from: str | None = None  # a checkpoint folder whose LoRA + patch embedding start this run (Stage 2)
    text_encoder: str | None = None  # folder with text_encoder/ + tokenizer/; None = base's, if it has them
    vae_bf16: bool = False  # encode with the VAE in bf16 on GPU (default fp32, as Wan's pipelines do)


@dataclasses.dataclass
class LoraSettings:
    """peft LoRA on the attention and feed-forward projections of every block."""

    rank: int = 32
    alpha: float = 32.0  # scale = alpha / rank
    targets: list[str] = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))


@dataclasses.dataclass
class OptimConfig:
    """AdamW over the adapter and the patch embedding."""

    lr: float = 1e-4  # peak learning rate
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01  # decoupled, on the LoRA matrices only (the patch embedding trains without it)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off


class LrDecay(str, enum.Enum):
    CONSTANT = "constant"
    COSINE = "cosine"


@dataclasses.dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warm-up, then constant or cosine down to min_lr_ratio x lr."""

    warmup_steps: int = 100
    decay: LrDecay = LrDecay.CONSTANT
    min_lr_ratio: float = 0.0  # cosine floor


class TimestepSampling(str, enum.Enum):
    SHIFTED = "shifted"  # u ~ U(0, 1), sigma = shift u / (1 + (shift - 1) u) (SD3 / Wan time shift)
    LOGIT_NORMAL = "logit_normal"  # sigma = sigmoid(N(logit_mean, logit_std)), then shifted likewise


@dataclasses.dataclass
class FlowConfig:
    """Flow matching: x_t = (1 - sigma) x0 + sigma noise, target v = noise - x0, MSE."""

    sampling: TimestepSampling = TimestepSampling.SHIFTED
    shift: float = 3.0  # time shift (1 = none); Wan2.1 uses 3.0 at 480p
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mask_weight: float = 0.0  # extra loss weight on latent cells with any pixel to inpaint (0 = plain MSE)


@dataclasses.dataclass
class LogConfig:
    """What is written when (steps are optimizer steps)."""

    every: int = 10  # stdout + metrics.jsonl
    val_every: int = 500  # validation loss on held-out shards; 0 = never
    val_batches: int = 8  # batches per validation (per worker)
    checkpoint_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 3  # newest checkpoints kept; 0 = keep all
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed


@dataclasses.dataclass
class RayConfig:
    """Ray Train: how many training workers, where (cluster shape only)."""

    num_workers: int = 0  # 0 = train in this process without Ray; >= 1 = Ray Train TorchTrainer workers
    use_gpu: bool = False  # one GPU per worker (NCCL); False = CPU workers (gloo)
    cpus_per_worker: float = 1.0  # fractional on small machines (2 CPU workers on 2 cores need < 1)
    address: str | None = None  # Ray cluster address; None = RAY_ADDRESS, else a local Ray


class Precision(str, enum.Enum):
    AUTO = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    BF16 = "bf16"
    FP32 = "fp32"


@dataclasses.dataclass
class TrainConfig:
    """``dreamstereo train``: Stage 1 (random masks) or Stage 2 (PBDP pairs) LoRA training."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    flow: FlowConfig = dataclasses.field(default_factory=FlowConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    output_dir: str | None = None  # local folder: metrics.jsonl, config.yaml, checkpoints/ (unless checkpoint_uri)
    checkpoint_uri: str | None = None  # where checkpoints go: None = OUTPUT_DIR/checkpoints, or s3://bucket/prefix
    resume: str | None = None  # latest (newest committed checkpoint, or a fresh start) | a checkpoint path
    overwrite: bool = False  # a new run (no resume) deletes the committed checkpoints it finds; False = refuse
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 1  # samples per optimizer step over all workers (global batch)
    micro_batch_size: int = 1  # samples per forward pass on one worker; accumulation makes up the rest
    seed: int = 0
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: Precision = Precision.AUTO
    gradient_checkpointing: bool = True  # recompute block activations in backward (memory for time)

    def __post_init__(self):
        """Refuse settings that would train on garbage: NaN/infinite numbers (``optim.lr=inf`` trains NaN
        weights), out-of-range rates and counts. Comparisons alone let NaN through (``nan <= 0`` is False)."""
        numbers = {"optim.lr": self.optim.lr, "optim.eps": self.optim.eps,
                   "optim.weight_decay": self.optim.weight_decay, "optim.grad_clip": self.optim.grad_clip,
                   "lora.alpha": self.lora.alpha,
                   "schedule.min_lr_ratio": self.schedule.min_lr_ratio, "flow.shift": self.flow.shift,
                   "flow.logit_mean": self.flow.logit_mean, "flow.logit_std": self.flow.logit_std,
                   "flow.mask_weight": self.flow.mask_weight,
                   **{f"optim.betas[{i}]": b for i, b in enumerate(self.optim.betas)}}
        bad = [f"{k}={v}" for k, v in numbers.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be a finite number")
        if (self.optim.eps <= 0 or self.optim.weight_decay < 0 or self.optim.grad_clip < 0 or self.lora.alpha <= 0
                or not all(0 <= b < 1 for b in self.optim.betas)):
            raise ValueError(f"optim.eps > 0, optim.weight_decay >= 0, optim.grad_clip >= 0 (0 = off), lora.alpha > 0 "
                             f"and optim.betas in [0, 1) needed, got {self.optim.eps}, {self.optim.weight_decay}, "
                             f"{self.optim.grad_clip}, {self.lora.alpha}, {self.optim.betas}")
        if self.schedule.warmup_steps < 0 or not 0 <= self.schedule.min_lr_ratio <= 1:
            raise ValueError(f"schedule.warmup_steps >= 0 and schedule.min_lr_ratio in [0, 1] needed, got "
                             f"{self.schedule.warmup_steps}, {self.schedule.min_lr_ratio}")
        log = self.log
        if log.every < 1 or log.val_every < 0 or log.val_batches < 1 or log.checkpoint_every < 0 \
                or log.keep_checkpoints < 0:
            raise ValueError(f"log.every >= 1, log.val_batches >= 1, log.val_every, log.checkpoint_every and "
                             f"log.keep_checkpoints >= 0 needed, got {log.every}, {log.val_batches}, {log.val_every}, "
                             f"{log.checkpoint_every}, {log.keep_checkpoints}")
        if self.max_steps < 1 or self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError(f"max_steps, batch_size, micro_batch_size must be >= 1, got {self.max_steps}, "
                             f"{self.batch_size}, {self.micro_batch_size}")
        if self.lora.rank < 1 or self.optim.lr <= 0 or len(self.optim.betas) != 2:
            raise ValueError(f"lora.rank >= 1, optim.lr > 0 and two optim.betas needed, got {self.lora.rank}, "
                             f"{self.optim.lr}, {self.optim.betas}")
        if self.flow.shift <= 0 or self.flow.mask_weight < 0 or self.flow.logit_std <= 0:
            raise ValueError(f"flow.shift > 0, flow.mask_weight >= 0, flow.logit_std > 0 needed, got "
                             f"{self.flow.shift}, {self.flow.mask_weight}, {self.flow.logit_std}")
        if self.overwrite and self.resume is not None:
            raise ValueError(f"overwrite=true starts a new run over old checkpoints: drop it or resume={self.resume}")
        if self.ray.num_workers < 0 or self.ray.cpus_per_worker <= 0:
            raise ValueError(f"ray.num_workers >= 0 and ray.cpus_per_worker > 0 needed, got "
                             f"{self.ray.num_workers}, {self.ray.cpus_per_worker}")

    def world_size(self) -> int:
        return max(1, self.ray.num_workers)

    def accumulation(self, world: int) -> int:
        """Micro-batches per optimizer step on each worker.

        Raises:
            ValueError: batch_size is not a multiple of world x micro_batch_size.
        """
        per_step = world * self.micro_batch_size
        if self.batch_size % per_step:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of workers ({world}) x "
                             f"micro_batch_size ({self.micro_batch_size})")
        return self.batch_size // per_step

