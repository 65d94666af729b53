"""The training loop of ``dreamstereo train``: one function, ``train``, read top to bottom.

Order (as nanoGPT's ``train.py``): config -> distributed context -> data -> model -> optimizer and LR
schedule -> resume -> one ``while`` loop (set LR, accumulate micro-steps, all-reduce, clip, step, log,
validate, checkpoint, stop). It runs in this process (``ray.num_workers=0``) or in each Ray Train worker
(``ray_train.py``), where ``torch.distributed`` is already initialised.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import resource
import socket
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from dreamstereo import __version__
from dreamstereo.config import to_yaml
from dreamstereo.io.shards import resolve_shards
from dreamstereo.io.storage import StorageError
from dreamstereo.models import wan_inpaint as wan
from dreamstereo.training import checkpoint as ckpt
from dreamstereo.training.config import LrDecay, Precision, TrainConfig
from dreamstereo.training.data import TrainBatches, _seed, frames_to_video, validation_batches
from dreamstereo.training.objective import flow_matching_loss, sample_sigmas
from dreamstereo.types import UserError

logger = logging.getLogger(__name__)


class TrainSetupError(UserError, ValueError):
    """A run that cannot start (a location not set, a batch size that does not split); says what to set."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss or the gradient norm of a step is not finite: the run stops before that step's update, so no
    checkpoint with NaN or infinite weights is ever committed; says what to change."""


# ----------------------------------------------------------------------------------------------------
# Helpers (each small; the loop below is the story)


def check_config(cfg: TrainConfig) -> None:
    """Fail before any work when a required location is missing."""
    if not cfg.output_dir:
        raise TrainSetupError("output_dir is not set: give output_dir=DIR (metrics.jsonl and checkpoints/ go there)")
    if not cfg.data.shards:
        raise TrainSetupError("data.shards is not set: give a `dreamstereo generate` output (folder or s3://...), "
                              "a brace pattern of tar URLs, or one .tar")
    if not cfg.model.base:
        raise wan.WeightsError(f"model.base is not set: give model.base=DIR, {wan.DOWNLOAD_HINT}")
    wan._transformer_folder(cfg.model.base)  # raises WeightsError naming what to provide
    try:
        cfg.accumulation(cfg.world_size())
    except ValueError as exc:
        raise TrainSetupError(str(exc)) from None


def checkpoint_store(cfg: TrainConfig) -> ckpt.CheckpointStore:
    return ckpt.CheckpointStore(cfg.checkpoint_uri or str(Path(cfg.output_dir) / "checkpoints"), cfg.data.s3)


def check_checkpoints(cfg: TrainConfig) -> None:
    """Fail before any work when the run would mix with another run's checkpoints, or when an explicit
    ``resume`` / ``model.init_from`` is not a committed checkpoint (nothing is downloaded).

    Raises:
        CheckpointConflict, StorageError (CheckpointError: the store's local path is a file or not writable).
    """
    ckpt.check_location(checkpoint_store(cfg))
    ckpt.check_fresh_start(checkpoint_store(cfg), resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.resume not in (None, "latest"):
        ckpt.check_committed(cfg.resume, cfg.data.s3)
    if cfg.model.init_from:
        ckpt.check_committed(cfg.model.init_from, cfg.data.s3)


def split_train_val(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    urls = resolve_shards(cfg.data.shards, cfg.data.s3)
    if cfg.data.val_shards:
        return urls, resolve_shards(cfg.data.val_shards, cfg.data.s3)
    n = cfg.data.holdout_shards
    if n and n >= len(urls):
        raise TrainSetupError(f"data.holdout_shards={n} leaves no training shard out of {len(urls)}")
    return (urls[:-n], urls[-n:]) if n else (urls, [])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    warmup = cfg.schedule.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule.decay is LrDecay.COSINE:
        progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
        floor = cfg.schedule.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def compute_loss(transformer, vae, batch: dict, prompt: torch.Tensor, cfg: TrainConfig, generator: torch.Generator,
                 device: torch.device, autocast) -> torch.Tensor:
    """Flow-matching loss of one micro-batch (see ``objective.py``); noise and sigmas come from ``generator``."""
    clean = frames_to_video(batch["clean"]).to(device)  # (B, 3, T, H, W) in [-1, 1]
    cond = frames_to_video(batch["cond"]).to(device)
    hole = batch["mask"][:, None].to(device)  # (B, 1, T, H, W) bool, True = to inpaint
    x0 = wan.encode_video(vae, clean)  # (B, 16, F, h, w)
    masked_latents = wan.encode_video(vae, wan.mask_video(cond, hole))
    known = wan.known_mask_channels(hole)  # (B, 4, F, h, w)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    sigmas = sample_sigmas(x0.shape[0], cfg.flow, generator).to(device)
    s = sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    with autocast():
        velocity = wan.predict_velocity(transformer, wan.build_model_input(noisy, known, masked_latents), sigmas,
                                        prompt)
    return flow_matching_loss(velocity, noise - x0, 1 - known, cfg.flow.mask_weight)


def all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over workers in one flat all-reduce per optimizer step. Done by hand, not by DDP:
    only the adapter and patch embedding have gradients, and reducing once after all micro-steps is
    what DDP's ``no_sync`` would do."""
    if world == 1:
        return

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def broadcast_params(params: list[torch.nn.Parameter], world: int) -> None:
    """Give every worker rank 0's trainable weights, as DDP does when it wraps a model: LoRA's A matrices
    are drawn from each rank's own RNG, and a checkpoint holds rank 0's weights only."""
    if world == 1:
        return

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def all_sum(values: list[float], world: int, device) -> list[float]:
    """Element-wise sums over workers, in one all-reduce."""
    if world == 1:
        return list(values)

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_mean(value: float, world: int, device) -> float:
    return all_sum([value], world, device)[0] / world


def clip_grads(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """The global L2 norm of the gradients (parameters without one count as zero), clipped to ``max_norm``
    when it is > 0."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norms = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def make_optimizer(transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the LoRA matrices only. The patch embedding is a full pretrained weight
    (plus its bias): decoupled decay would pull it towards zero rather than towards its pretrained value, so
    it trains without decay (the usual exclusion of biases and embeddings, as in nanoGPT's
    ``configure_optimizers``)."""
    decay, no_decay = [], []
    for name, param in transformer.named_parameters():
        if param.requires_grad:
            (no_decay if name.startswith("patch_embedding.") else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def gather(obj, world: int) -> list:
    if world == 1:
        return [obj]

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, world: int):
    """Rank 0's ``obj`` on every rank."""
    if world == 1:
        return obj

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def node_id() -> str:
    """This worker's machine: the Ray node id inside Ray, else the host name."""
    try:
        import ray  # local: training without Ray never pays its import (~1 s)

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return socket.gethostname()


def check_store_shared(store: ckpt.CheckpointStore, nodes: list[str], visible: list[bool]) -> None:
    """With workers on several machines, a local ``checkpoint_uri`` must be one folder that all of them see
    (a shared file system): rank 0 writes the checkpoints and every rank reads the one it resumes from.

    Args:
        nodes: the node of each rank. visible: whether each rank saw the probe file rank 0 wrote.

    Raises:
        TrainSetupError: some rank on another node does not see rank 0's folder.
    """
    if store.is_s3 or len(set(nodes)) == 1 or all(visible):
        return
    blind = [rank for rank, seen in enumerate(visible) if not seen]
    raise TrainSetupError(f"checkpoint_uri {store.uri!r} is a local folder that ranks {blind} (on other nodes than "
                          f"rank 0) do not see: with workers on {len(set(nodes))} nodes give an s3:// "
                          f"checkpoint_uri or a folder on a shared file system")


def noise_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of a rank's noise generator: different on every rank, and new after a change of worker layout."""
    return _seed("noise", seed, rank, step)


def rng_state(generator: torch.Generator) -> dict:
    """This process's RNG states as tensors and plain values (what ``torch.load(weights_only=True)`` reads
    back): Python's as its ``getstate()`` tuple of ints, numpy's Mersenne Twister key as an int64 tensor."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                            "pos": int(numpy_state["state"]["pos"])}
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loop": generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved (this rank's entry of a checkpoint's ``rng`` list)."""
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {"key": numpy_state["state"]["key"].numpy().astype(np.uint32),
                            "pos": numpy_state["state"]["pos"]}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["loop"])


def read_checkpoint(uri: str, s3, *, with_state: bool) -> dict:
    """What a run takes from a checkpoint, in memory: ``adapter`` tensors, ``prompt`` (embedding, source) and,
    ``with_state``, the ``state`` dict. An ``s3://`` checkpoint is downloaded once, to a temporary folder that
    is deleted right after. Nothing read runs code (see ``checkpoint.load_training_state``).

    Raises:
        CheckpointError: a file is missing, damaged, of an older format or holds more than data.
    """
    with ckpt.fetched(uri, s3) as folder:
        out = {"adapter": ckpt.load_tensors(folder, ckpt.ADAPTER_FILE, uri), "prompt": ckpt.load_prompt(folder, uri)}
        if with_state:
            out["state"] = ckpt.load_training_state(folder, uri)
    return out


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line), and TensorBoard events when installed; rank 0 only."""

    def __init__(self, output_dir: Path, *, resume_step: int, tensorboard: bool):
        self.path = output_dir / "metrics.jsonl"
        if self.path.exists():  # drop what a crashed run logged after the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                logger.info("tensorboard is not installed: metrics go to %s only", self.path)

    def write(self, record: dict) -> None:
        """Append ``record``; a NaN or infinite number is written as null, so every line stays strict JSON."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()


def write_checkpoint(store: ckpt.CheckpointStore, step: int, transformer, optimizer, scheduler,
                     rng_states: list[dict], prompt: torch.Tensor, prompt_source: str, data_state: dict, samples: int,
                     cfg: TrainConfig) -> str:
    """Assemble a checkpoint folder locally and commit it to the store (rank 0); ``rng_states`` holds every
    rank's :func:`rng_state`, in rank order. ``training_state.pt`` holds tensors and plain values only
    (``checkpoint.load_training_state`` reads it without unpickling any object)."""
    with tempfile.TemporaryDirectory(prefix="dreamstereo-ckpt-") as tmp:
        folder = Path(tmp)
        save_file(wan.trainable_state_dict(transformer), str(folder / ckpt.ADAPTER_FILE), metadata={"format": "pt"})
        lora_config = transformer.peft_config["default"].to_dict()
        lora_config = {k: sorted(v) if isinstance(v, set) else v for k, v in lora_config.items()}
        (folder / ckpt.ADAPTER_CONFIG_FILE).write_text(json.dumps(lora_config, indent=2, default=str))
        wan.save_prompt_embedding(folder / wan.PROMPT_EMBEDDING_FILE, prompt, source=prompt_source)
        torch.save({"format": ckpt.STATE_FORMAT, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step, "samples": samples, "rng": rng_states,
                    "data": data_state}, folder / ckpt.STATE_FILE)
        note = wan.smoke_test(cfg.model.base)
        (folder / ckpt.CONFIG_FILE).write_text(to_yaml(cfg, note=note))
        (folder / ckpt.META_FILE).write_text(json.dumps({
            "step": step, "samples": samples, "base": cfg.model.base, "in_channels": wan.INPAINT_IN_CHANNELS,
            "lora_rank": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "package_version": __version__,
            **({"smoke_test": note} if note else {})}, indent=2))
        return store.save(step, folder)


# ----------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, *, rank: int = 0, world: int = 1,
          prompt_embedding: tuple[torch.Tensor, str] | None = None) -> dict:
    """Train (or resume) and return a summary: ``step``, ``losses`` (per step, averaged over workers),
    ``checkpoint`` (the last one written, rank 0) and ``transformer`` (the trained model, in this process).

    Args:
        prompt_embedding: ``((1, L, text_dim) float32, source)``, the empty-prompt embedding when the Ray
            driver resolved it (so workers never load umT5); None = resolve it here. A checkpoint this run
            resumes or starts from (``model.init_from``) brings its own, which wins.
    """
    # 1. Context: device, precision, seeds -------------------------------------------------------------
    check_config(cfg)
    master = rank == 0
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    use_bf16 = cfg.precision is Precision.BF16 or (cfg.precision is Precision.AUTO and device.type == "cuda")
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed((cfg.seed + rank) % 2**32)
    random.seed(cfg.seed + rank)
    generator = torch.Generator().manual_seed(noise_seed(cfg.seed, rank))  # noise and sigmas, one per rank
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accumulation = cfg.accumulation(world)

    # 2. Checkpoint store and resume point (before the data, whose position it holds) ------------------
    # Rank 0 decides (a fresh run may not mix with another run's checkpoints; `latest` is resolved once)
    # and tells the others, who may be on machines that see nothing of a local store.
    store = checkpoint_store(cfg)
    nodes = gather(node_id(), world) if world > 1 else ["this process"]
    if len(set(nodes)) > 1 and not store.is_s3:  # is the local folder the same folder on every node?
        probe = Path(store.uri) / f".probe-{uuid.uuid4().hex}"
        if master:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_text("rank 0 wrote this; every rank must see it")
        probe = broadcast(probe, world)
        visible = gather(probe.is_file(), world)
        if master:
            probe.unlink(missing_ok=True)
        check_store_shared(store, nodes, visible)
    decided = None
    if master:
        try:
            ckpt.clean_leftovers(store)  # before `latest` is looked for: a restored step counts
            check_checkpoints(cfg)  # (also: the store's local path must be able to become a folder)
            if cfg.overwrite and store.steps():
                logger.warning("overwrite=true: deleting the checkpoints %s under %s", store.steps(), store.uri)
                store.clear()
            decided = (ckpt.resolve_resume(cfg.resume, store), None)
        except (ckpt.CheckpointConflict, StorageError) as exc:
            decided = (None, exc)
    resume_uri, error = broadcast(decided, world)
    if error is not None:
        raise error
    start = read_checkpoint(resume_uri, cfg.data.s3, with_state=True) if resume_uri else None
    state = start["state"] if start else None

    # 3. Data: this worker's streams, positioned where the checkpoint left them ------------------------
    train_urls, val_urls = split_train_val(cfg)
    streams = max(1, cfg.data.num_workers)
    data_state = (state or {}).get("data")
    start_states, batches_done, data_seed = None, 0, cfg.seed
    if data_state and data_state["world"] == world and data_state["streams"] == streams:
        start_states, batches_done = data_state["states"][rank], data_state["batches_done"]
    elif state is not None:
        logger.warning("resuming with another worker layout (%s -> world %d, %d streams): data streams restart "
                       "with a new seed", {k: data_state.get(k) for k in ("world", "streams")} if data_state else None,
                       world, streams)
        data_seed = cfg.seed + state["step"]
    try:
        dataset = TrainBatches(train_urls, cfg.data, batch_size=cfg.micro_batch_size, seed=data_seed, rank=rank,
                               world=world, states=start_states, batches_done=batches_done)
    except ValueError as exc:  # fewer shards than data streams
        raise TrainSetupError(str(exc)) from None
    stream_states = list(dataset.states)
    batches = dataset.batches()
    val_set = []
    if val_urls and cfg.log.val_every:
        mine = val_urls[rank::world] if len(val_urls) >= world else val_urls
        val_set = validation_batches(mine, cfg.data, batch_size=cfg.micro_batch_size, seed=cfg.seed,
                                     max_batches=cfg.log.val_batches)

    # 4. Model: 36-channel Wan, LoRA, frozen VAE, the stored empty-prompt embedding ---------------------
    transformer = wan.load_inpaint_model(cfg.model.base, device=str(device))
    wan.add_lora(transformer, rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=cfg.lora.targets)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    vae = wan.load_vae(cfg.model.base, dtype=torch.bfloat16 if (cfg.model.vae_bf16 and use_bf16) else torch.float32,
                       device=str(device))
    init = start or (read_checkpoint(cfg.model.init_from, cfg.data.s3, with_state=False)
                     if cfg.model.init_from else None)
    if init is not None:
        prompt, prompt_source = init["prompt"]
        wan.load_trainable_state_dict(transformer, init["adapter"])
    elif prompt_embedding is not None:
        prompt, prompt_source = prompt_embedding
    else:
        prompt, prompt_source = wan.resolve_prompt_embedding(cfg.model.base, transformer.config.text_dim,
                                                             text_encoder=cfg.model.text_encoder)
    prompt = prompt.to(device)
    params = [p for p in transformer.parameters() if p.requires_grad]
    broadcast_params(params, world)

    # 5. Optimizer and LR schedule ---------------------------------------------------------------------
    optimizer = make_optimizer(transformer, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg))
    step, samples, shards_skipped = 0, 0, (data_state or {}).get("shards_skipped", 0)
    if state is not None:
        if len(state["optimizer"]["param_groups"]) != len(optimizer.param_groups):
            raise TrainSetupError(f"{resume_uri} was written before the patch embedding left weight decay (its "
                                  f"optimizer state has {len(state['optimizer']['param_groups'])} parameter "
                                  f"group(s), not {len(optimizer.param_groups)}): start from its weights with "
                                  f"model.init_from={resume_uri} and a new output_dir instead")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, samples = state["step"], state["samples"]
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older checkpoints: rank 0's
        if len(rngs) == world:
            set_rng_state(rngs[rank], generator)
        else:
            generator.manual_seed(noise_seed(cfg.seed, rank, step))
            if master:
                logger.warning("resuming on %d worker(s) from RNG states of %d: noise restarts with new seeds",
                               world, len(rngs))
        # The schedule of this run's config from here on (max_steps or lr may differ from the saved run's).
        scheduler.base_lrs = [cfg.optim.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_at(step, cfg)
        if master:
            logger.info("resumed from %s at step %d", resume_uri, step)
    log = MetricsLog(output_dir, resume_step=step, tensorboard=cfg.log.tensorboard) if master else None
    if master and cfg.data.stage.value == "pairs" and not cfg.model.init_from and state is None:
        logger.warning("Stage 2 (data.stage=pairs) without model.init_from: the adapter starts from zero, "
                       "not from a Stage 1 checkpoint")
    if master:
        note = wan.smoke_test(cfg.model.base)
        if note:
            logger.warning("model.base=%s: %s", cfg.model.base, note)
        (output_dir / "config.yaml").write_text(to_yaml(cfg, note=note))
        logger.info("training %s on %d worker(s): %d trainable of %d parameters, prompt embedding from %s, "
                    "%d micro-step(s) of %d per step", cfg.data.stage.value, world, sum(p.numel() for p in params),
                    sum(p.numel() for p in transformer.parameters()), prompt_source, accumulation,
                    cfg.micro_batch_size)
    shards_read: set[str] = set()
    losses, last_checkpoint = [], None

    # 6. The loop --------------------------------------------------------------------------------------
    window_start, window_loss, window_samples = time.perf_counter(), 0.0, 0
    while step < cfg.max_steps:
        step_loss, step_samples, step_skipped = 0.0, 0, 0
        for _ in range(accumulation):
            batch = next(batches)
            stream_states[batch["logical"]] = batch["state"]
            batches_done += 1
            step_skipped += batch["shards_skipped"]
            shards_read.update(batch["urls"])
            loss = compute_loss(transformer, vae, batch, prompt, cfg, generator, device, autocast)
            (loss / accumulation).backward()
            step_loss += loss.item() / accumulation
            step_samples += len(batch["keys"])  # clips too short for num_frames are dropped from their batch
        all_reduce_grads(params, world)
        grad_norm = clip_grads(params, cfg.optim.grad_clip)
        lr = optimizer.param_groups[0]["lr"]  # the rate of this step (scheduler.step() sets the next one)
        loss_sum, samples_sum, skipped_sum = all_sum([step_loss, step_samples, step_skipped], world, device)
        step_loss = loss_sum / world
        shards_skipped += int(skipped_sum)
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):  # the same on every rank: all stop
            if master:
                log.write({"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                           "stopped": "non-finite loss or gradient norm"})
            raise TrainingDiverged(f"step {step + 1}: loss {step_loss}, gradient norm {grad_norm}: not finite, "
                                   f"stopped before the update (last checkpoint: {last_checkpoint or 'none this run'})"
                                   f"; lower optim.lr (now {cfg.optim.lr}) or set optim.grad_clip > 0")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        samples += int(samples_sum)
        window_samples += int(samples_sum)
        window_loss += step_loss
        losses.append(step_loss)

        val_loss = None
        if val_set and (step % cfg.log.val_every == 0 or step == cfg.max_steps):
            transformer.eval()
            val_gen = torch.Generator().manual_seed(cfg.seed + 10_000)  # the same noise at every evaluation
            with torch.no_grad():
                val_loss = sum(float(compute_loss(transformer, vae, b, prompt, cfg, val_gen, device, autocast))
                               for b in val_set) / len(val_set)
            val_loss = all_mean(val_loss, world, device)
            transformer.train()

        if step % cfg.log.every == 0 or step == cfg.max_steps or val_loss is not None:
            elapsed = time.perf_counter() - window_start
            steps_in_window = (step - 1) % cfg.log.every + 1
            record = {"step": step, "loss": step_loss, "loss_avg": window_loss / steps_in_window, "lr": lr,
                      "grad_norm": grad_norm, "samples": samples, "samples_per_s": window_samples / elapsed,
                      "memory_gb": memory_gb(device), "shards_skipped": shards_skipped}
            if val_loss is not None:
                record["val_loss"] = val_loss
            if master:
                log.write(record)
                logger.info("step %d/%d  loss %.4f (avg %.4f)  lr %.2e  %.2f samples/s  %.2f GB%s", step,
                            cfg.max_steps, step_loss, record["loss_avg"], record["lr"], record["samples_per_s"],
                            record["memory_gb"], f"  validation loss {val_loss:.4f}" if val_loss is not None else "")
            if step % cfg.log.every == 0:
                window_start, window_loss, window_samples = time.perf_counter(), 0.0, 0

        if (cfg.log.checkpoint_every and step % cfg.log.checkpoint_every == 0) or step == cfg.max_steps:
            # Finite loss and gradients can still step a weight to infinity (a huge finite optim.lr); the
            # weights are the same on every rank, so every rank stops here and no rank waits for rank 0.
            broken = ckpt.nonfinite_tensors({n: p for n, p in transformer.named_parameters() if p.requires_grad})
            if broken:
                raise TrainingDiverged(f"step {step}: {len(broken)} trainable tensor(s) hold NaN or infinity (e.g. "
                                       f"{broken[0]}), no checkpoint written (last: "
                                       f"{last_checkpoint or 'none this run'}); lower optim.lr (now {cfg.optim.lr})")
            per_rank = gather((list(stream_states), rng_state(generator)), world)  # [(streams, rng)] by rank
            if master:
                data = {"world": world, "streams": streams, "batches_done": batches_done,
                        "states": [streams_of_rank for streams_of_rank, _ in per_rank],
                        "shards_skipped": shards_skipped}
                last_checkpoint = write_checkpoint(store, step, transformer, optimizer, scheduler,
                                                   [rng for _, rng in per_rank], prompt, prompt_source, data,
                                                   samples, cfg)
                store.prune(cfg.log.keep_checkpoints)
                logger.info("step %d  checkpoint %s", step, last_checkpoint)

    # 7. What each worker read (disjoint shards across workers), and the summary ------------------------
    ranks_dir = output_dir / "ranks"
    ranks_dir.mkdir(exist_ok=True)
    (ranks_dir / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "step": step,
                                                             "shards_read": sorted(shards_read)}, indent=2))
    return {"step": step, "losses": losses, "checkpoint": last_checkpoint, "transformer": transformer}
