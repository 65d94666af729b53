"""Training on many workers with Ray Train: a ``TorchTrainer`` runs ``train.train`` on every worker.

The same Ray cluster that generated the shards trains on them. Ray starts the workers, places them (one GPU
each with ``ray.use_gpu``, or CPU workers on gloo) and initialises ``torch.distributed``; the loop does the
rest (its data streams split the shards by rank, gradients are averaged by all-reduce, rank 0 logs and
writes checkpoints to ``checkpoint_uri``: a local or shared folder, or ``s3://``). With more than one node,
give an ``s3://`` checkpoint_uri (or a shared file system): the loop refuses a local folder that the other
nodes do not see.

The driver does the once-per-run work before any worker is placed: it checks the config and the checkpoint
store, and resolves the empty-prompt embedding (umT5 runs here, once, not in every worker). A setup error
raised inside a worker (``WeightsError``, ``StorageError``, ...) comes back out of Ray as itself, so the
CLI prints its one-line message.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import ray
import ray.train
import torch
from omegaconf import OmegaConf
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from dreamstereo.config import to_plain
from dreamstereo.models import wan_inpaint as wan
from dreamstereo.training import checkpoint as ckpt
from dreamstereo.training.config import TrainConfig
from dreamstereo.training.train import check_checkpoints, check_config, checkpoint_store, train
from dreamstereo.types import UserError, original_error

logger = logging.getLogger(__name__)


def _worker(loop_config: dict) -> None:
    """Entry point on every Ray Train worker: rebuild the config, run the loop with this worker's rank."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    torch.set_num_threads(loop_config["threads"])
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), loop_config["config"]))
    context = ray.train.get_context()

    result = train(cfg, rank=context.get_world_rank(), world=context.get_world_size(),
                   prompt_embedding=loop_config.get("prompt_embedding"))
    ray.train.report({"step": result["step"], "loss": result["losses"][-1] if result["losses"] else None})


def driver_prompt_embedding(cfg: TrainConfig) -> tuple | None:
    """The empty-prompt embedding the workers start with, resolved once here; None when every worker takes
    it from a checkpoint (``model.init_from``, or a checkpoint the run resumes from)."""
    if cfg.model.init_from or (cfg.resume is not None and
                               ckpt.resolve_resume(cfg.resume, checkpoint_store(cfg)) is not None):
        return None
    text_dim = wan.transformer_config(cfg.model.base)["text_dim"]
    embedding, source = wan.resolve_prompt_embedding(cfg.model.base, text_dim, text_encoder=cfg.model.text_encoder)
    return embedding, f"{source} (resolved once by the Ray driver)"


def setup_error(exc: BaseException) -> Exception | None:
    """The first user error (bad input, a bad setting, a diverged run: the ones the CLI maps to exit 2 with one
    line) a worker raised, unwrapped from Ray's wrappers (Ray Train V2's ``WorkerGroupError`` among them);
    None when the failure is something else (a bug: it keeps its traceback)."""
    return original_error(exc, UserError)


def run_ray_training(cfg: TrainConfig, *, threads_per_worker: int | None = None) -> dict:
    """Run ``cfg`` on ``cfg.ray.num_workers`` Ray Train workers; returns ``{"step", "loss"}`` of the run.

    Raises:
        UserError (WeightsError, StorageError, TrainSetupError, CheckpointConflict, TrainDataError,
            TrainingDiverged): bad input or a diverged run, found on the driver or in a worker.
        RuntimeError: a worker failed otherwise (the message carries the worker's error).
    """
    check_config(cfg)  # fail on the driver, before any worker is placed
    check_checkpoints(cfg)
    prompt_embedding = driver_prompt_embedding(cfg)
    started = False
    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address or "local", **({} if address else {"include_dashboard": False}))
        started = True
    try:
        resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {})}
        threads = threads_per_worker or max(1, int(cfg.ray.cpus_per_worker))
        output = Path(cfg.output_dir).resolve()
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"config": to_plain(cfg), "threads": threads, "prompt_embedding": prompt_embedding},
            torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name="ray", storage_path=str(output)),
        )
        try:
            result = trainer.fit()
        except Exception as exc:
            error = setup_error(exc)
            if error is not None:
                raise error from None
            raise
        if getattr(result, "error", None) is not None:
            error = setup_error(result.error)
            if error is not None:
                raise error from None
            raise RuntimeError(f"Ray Train failed: {result.error}")
        metrics = dict(result.metrics or {})
        if "step" not in metrics:  # Ray Train V2 keeps only metrics reported with a checkpoint: read ours

            log = output / "metrics.jsonl"
            last = json.loads(log.read_text().splitlines()[-1]) if log.is_file() else {}
            metrics = {"step": checkpoint_store(cfg).latest() or last.get("step"), "loss": last.get("loss")}
        return metrics
    finally:
        if started:
            ray.shutdown()
