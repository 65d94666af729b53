"""The training loop end to end on the toy model: overfitting, checkpoint contract, exact resume, export,
CLI errors, and 2 Ray Train workers on gloo."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreamstereo.cli import main
from dreamstereo.config import load_config
from dreamstereo.models import wan_inpaint as wan
from dreamstereo.training.config import TrainConfig
from dreamstereo.training.train import train

TINY = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny.yaml"


def _cfg(toy_wan, shards, out, *overrides) -> TrainConfig:
    return load_config(TrainConfig, [TINY], [f"model.base={toy_wan}", f"data.shards={shards}",
                                             f"output_dir={out}", *overrides])


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(toy_wan, raw_shards, tmp_path_factory):
    """The tiny preset through the CLI: 60 steps on 6 clips (1 of 4 shards held out for validation)."""
    out = tmp_path_factory.mktemp("tiny-run")
    base_files = _digest(toy_wan)
    code = main(["-q", "train", str(TINY), f"model.base={toy_wan}", f"data.shards={raw_shards[0]}",
                 f"output_dir={out}", "data.holdout_shards=1"])
    assert code == 0
    return out, base_files


def test_tiny_model_overfits_a_handful_of_samples(tiny_run):
    out, _ = tiny_run
    metrics = _metrics(out)
    losses = [m["loss"] for m in metrics]
    assert [m["step"] for m in metrics] == list(range(1, 61))
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"tiny run: mean loss of steps 1-10 {first:.4f}, of steps 51-60 {last:.4f}, ratio {last / first:.3f}")
    assert last <= 0.7 * first
    assert all(k in metrics[-1] for k in ("lr", "samples_per_s", "memory_gb", "grad_norm"))
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 3 and all(np.isfinite(val))  # steps 20, 40, 60 on the held-out shard


def test_checkpoint_holds_only_adapter_and_patch_embedding_and_base_is_untouched(tiny_run, toy_wan):
    out, base_files = tiny_run
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step-00000040", "step-00000060"]  # keep_checkpoints: 2; no temporary folder left
    folder = out / "checkpoints" / "step-00000060"
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "adapter_model.safetensors", "adapter_config.json", "prompt_embedding.safetensors", "training_state.pt",
        "config.yaml", "meta.json"])
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert set(tensors) >= {"patch_embedding.weight", "patch_embedding.bias"}
    assert all(".lora_A." in k or ".lora_B." in k or k.startswith("patch_embedding.") for k in tensors)
    assert any(".lora_B." in k and t.abs().sum() > 0 for k, t in tensors.items())  # the adapter learned
    assert tensors["patch_embedding.weight"].shape[1] == 36
    state = torch.load(folder / "training_state.pt", weights_only=False)
    assert state["step"] == 60 and {"optimizer", "scheduler", "rng", "data"} <= set(state)
    # Base weights bit-identical: the files, and the frozen tensors of a model trained in this process.
    assert _digest(toy_wan) == base_files
    base = load_file(f"{toy_wan}/transformer/diffusion_pytorch_model.safetensors")
    model = wan.load_inpaint_model(toy_wan)
    wan.add_lora(model, rank=8, alpha=8)
    wan.load_trainable_state_dict(model, tensors)
    live = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    for key, value in base.items():
        if not key.startswith("patch_embedding."):
            assert torch.equal(live[key], value), key
    assert "stage" in (folder / "config.yaml").read_text()


def test_export_merges_lora_into_a_standalone_model(tiny_run, toy_wan, tmp_path):
    out, _ = tiny_run
    folder = out / "checkpoints" / "step-00000060"
    assert main(["-q", "export", str(folder), "--out", str(tmp_path / "model")]) == 0
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "dreamstereo_model.json", "prompt_embedding.safetensors", "transformer", "vae"]
    merged = wan.load_inpaint_model(tmp_path / "model").eval()
    adapter = wan.load_inpaint_model(toy_wan)
    wan.add_lora(adapter, rank=8, alpha=8)
    wan.load_trainable_state_dict(adapter, load_file(str(folder / "adapter_model.safetensors")))
    adapter.eval()
    prompt, _ = wan.resolve_prompt_embedding(tmp_path / "model", text_dim=16)  # the stored one, no umT5
    x, sigma = torch.randn(1, 36, 2, 8, 8), torch.tensor([0.7])
    with torch.no_grad():
        torch.testing.assert_close(wan.predict_velocity(merged, x, sigma, prompt),
                                   wan.predict_velocity(adapter, x, sigma, prompt), rtol=1e-4, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())


def test_resume_reproduces_the_uninterrupted_losses_exactly(toy_wan, raw_shards, tmp_path):
    overrides = ["max_steps=6", "log.checkpoint_every=3", "log.keep_checkpoints=0", "data.shuffle_buffer=3",
                 "schedule.decay=cosine", "schedule.warmup_steps=2"]
    whole = train(_cfg(toy_wan, raw_shards[0], tmp_path / "whole", *overrides))
    train(_cfg(toy_wan, raw_shards[0], tmp_path / "split", *overrides, "max_steps=3"))
    resumed = train(_cfg(toy_wan, raw_shards[0], tmp_path / "split", *overrides, "resume=latest"))
    assert resumed["losses"] == whole["losses"][3:]  # bit-exact on CPU
    assert [m["loss"] for m in _metrics(tmp_path / "split")] == whole["losses"]
    a = load_file(str(tmp_path / "whole/checkpoints/step-00000006/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split/checkpoints/step-00000006/adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage2_pairs_train_from_a_stage1_checkpoint(tiny_run, toy_wan, pair_shards, tmp_path):
    out, _ = tiny_run
    init = out / "checkpoints" / "step-00000060"
    result = train(_cfg(toy_wan, pair_shards[0], tmp_path, "data.stage=pairs", "max_steps=2",
                        f"model.init_from={init}", "flow.mask_weight=2.0"))
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))
    stage1 = load_file(str(init / "adapter_model.safetensors"))
    fresh = train(_cfg(toy_wan, pair_shards[0], tmp_path / "fresh", "data.stage=pairs", "max_steps=1",
                       "log.checkpoint_every=0"))
    assert fresh["losses"][0] != result["losses"][0]  # the Stage 1 adapter was loaded
    assert stage1["patch_embedding.weight"].abs().sum() > 0


def test_checkpoints_go_to_s3_and_resume_from_there(toy_wan, raw_shards, s3_bucket, s3_env, tmp_path):
    from tests.conftest import S3_SECRET

    uri = f"s3://{s3_bucket}/runs/a"
    common = [f"checkpoint_uri={uri}", f"data.s3.endpoint_url={s3_env}", "log.checkpoint_every=2",
              "log.keep_checkpoints=1"]
    whole = train(_cfg(toy_wan, raw_shards[0], tmp_path / "whole", "max_steps=4", "log.checkpoint_every=2"))
    train(_cfg(toy_wan, raw_shards[0], tmp_path / "a", "max_steps=2", *common))
    resumed = train(_cfg(toy_wan, raw_shards[0], tmp_path / "a", "max_steps=4", "resume=latest", *common))
    assert resumed["losses"] == whole["losses"][2:]
    from dreamstereo.pipeline.io.storage import S3Config, S3Storage

    storage = S3Storage(uri, S3Config(endpoint_url=s3_env))
    keys = storage.list("")
    assert {k.split("/")[0] for k in keys} == {"step-00000004"}  # step 2 pruned
    assert all(S3_SECRET.encode() not in storage.read_bytes(k) for k in keys)
    assert all(S3_SECRET not in p.read_text(errors="ignore") for p in (tmp_path / "a").rglob("*") if p.is_file())


def test_missing_base_model_fails_with_what_to_provide(raw_shards, tmp_path, capsys):
    code = main(["train", str(TINY), f"model.base={tmp_path}/missing", f"data.shards={raw_shards[0]}",
                 f"output_dir={tmp_path}/out"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "Wan2.1-T2V-1.3B" in err and "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in err
    code = main(["train", str(TINY), f"data.shards={raw_shards[0]}", f"output_dir={tmp_path}/out"])
    assert code == 2 and "model.base is not set" in capsys.readouterr().err
    code = main(["train", str(TINY), f"model.base={tmp_path}", f"output_dir={tmp_path}/out"])
    assert code == 2 and "data.shards is not set" in capsys.readouterr().err


def test_explicit_resume_path_must_exist(toy_wan, raw_shards, tmp_path, capsys):
    code = main(["train", str(TINY), f"model.base={toy_wan}", f"data.shards={raw_shards[0]}",
                 f"output_dir={tmp_path}/out", f"resume={tmp_path}/no-such-checkpoint"])
    assert code == 2 and "not a committed checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ray_train_workers_read_disjoint_shards(toy_wan, raw_shards, tmp_path, monkeypatch):
    import ray

    from dreamstereo.training.ray_train import run_ray_training

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024 * 1024)
    try:
        cfg = _cfg(toy_wan, raw_shards[0], tmp_path, "ray.num_workers=2", "ray.cpus_per_worker=0.5",
                   "micro_batch_size=1", "max_steps=3", "log.checkpoint_every=0")
        result = run_ray_training(cfg)
    finally:
        ray.shutdown()
    assert result["step"] == 3
    read = [set(json.loads((tmp_path / "ranks" / f"rank-{r}.json").read_text())["shards_read"]) for r in (0, 1)]
    assert read[0] and read[1] and not read[0] & read[1]
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "checkpoints" / "step-00000003" / "meta.json").is_file()
