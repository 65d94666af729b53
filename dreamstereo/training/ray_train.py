"""Training on many workers with Ray Train: a ``TorchTrainer`` runs ``train.train`` on every worker.

The same Ray cluster that generated the shards trains on them. Ray starts the workers, places them (one GPU
each with ``ray.use_gpu``, or CPU workers on gloo) and initialises ``torch.distributed``; the loop does the
rest (its data streams split the shards by rank, gradients are averaged by all-reduce, rank 0 logs and
writes checkpoints to ``checkpoint_uri``: a local or shared folder, or ``s3://``). With more than one node,
give an ``s3://`` checkpoint_uri (or a shared file system) so a resumed run finds the checkpoints
wherever its rank 0 lands.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dreamstereo.config import to_plain
from dreamstereo.training.config import TrainConfig

logger = logging.getLogger(__name__)


def _worker(loop_config: dict) -> None:
    """Entry point on every Ray Train worker: rebuild the config, run the loop with this worker's rank."""
    import ray.train
    from omegaconf import OmegaConf

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(loop_config["threads"])
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), loop_config["config"]))
    context = ray.train.get_context()
    from dreamstereo.training.train import train

    result = train(cfg, rank=context.get_world_rank(), world=context.get_world_size())
    ray.train.report({"step": result["step"], "loss": result["losses"][-1] if result["losses"] else None})


def run_ray_training(cfg: TrainConfig, *, threads_per_worker: int | None = None) -> dict:
    """Run ``cfg`` on ``cfg.ray.num_workers`` Ray Train workers; returns ``{"step", "loss"}`` of the run.

    Raises:
        RuntimeError: a worker failed (the message carries the worker's error).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dreamstereo.training.train import check_config

    check_config(cfg)  # fail on the driver, before any worker is placed
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
            train_loop_config={"config": to_plain(cfg), "threads": threads},
            torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name="ray", storage_path=str(output)),
        )
        result = trainer.fit()
        if getattr(result, "error", None) is not None:
            raise RuntimeError(f"Ray Train failed: {result.error}")
        metrics = dict(result.metrics or {})
        if "step" not in metrics:  # Ray Train V2 keeps only metrics reported with a checkpoint: read ours
            from dreamstereo.training.checkpoint import CheckpointStore

            store = CheckpointStore(cfg.checkpoint_uri or str(output / "checkpoints"), cfg.data.s3)
            log = output / "metrics.jsonl"
            last = json.loads(log.read_text().splitlines()[-1]) if log.is_file() else {}
            metrics = {"step": store.latest() or last.get("step"), "loss": last.get("loss")}
        return metrics
    finally:
        if started:
            ray.shutdown()
