"""The training loop end to end on the toy model: overfitting, checkpoint contract, exact resume, export,
Stage 2 from Stage 1, gradient checkpointing, one run per checkpoint store, CLI errors, and 2 Ray Train
workers on gloo (disjoint shards, exact resume with per-rank RNG states, errors out of workers)."""

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
from tests.training.shards import write_shards

TINY = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny.yaml"


def _cfg(toy_wan, shards, out, *overrides) -> TrainConfig:
    return load_config(TrainConfig, [TINY], [f"model.base={toy_wan}", f"data.shards={shards}",
                                             f"output_dir={out}", *overrides])


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).rglob("*") if p.is_file()}


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
    # The rate each step used: warm-up 1/5, 2/5, ... of 0.005 over 5 steps (not the next step's rate).
    assert [m["lr"] for m in metrics[:6]] == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.005, 0.005])
    assert [m["samples"] for m in metrics] == [2 * m["step"] for m in metrics]
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
    assert _digest(toy_wan) == base_files  # the base files are untouched (the frozen tensors: see below)
    assert "stage" in (folder / "config.yaml").read_text()


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
    same = ["data.stage=pairs", "max_steps=1", "log.checkpoint_every=0", "flow.mask_weight=2.0"]
    result = train(_cfg(toy_wan, pair_shards[0], tmp_path / "stage2", *same, f"model.init_from={init}"))
    fresh = train(_cfg(toy_wan, pair_shards[0], tmp_path / "fresh", *same))  # the same run without init_from
    assert np.isfinite(result["losses"][0]) and result["losses"][0] != fresh["losses"][0]
    # The run started from the Stage 1 weights: one AdamW step (tiny preset: no weight decay, step-1 rate
    # 0.005 / 5) moves a weight by at most that rate, so after it every adapter and patch-embedding tensor is
    # still within 0.001 of the Stage 1 checkpoint's, while the run without init_from is far from them.
    stage1 = load_file(str(init / "adapter_model.safetensors"))
    started, unrelated = wan.trainable_state_dict(result["transformer"]), wan.trainable_state_dict(fresh["transformer"])
    assert set(started) == set(stage1)
    assert max(float((started[k] - stage1[k]).abs().max()) for k in stage1) <= 0.001 * 1.001 + 1e-7
    assert max(float((unrelated[k] - stage1[k]).abs().max()) for k in stage1) > 0.01


@pytest.fixture(scope="module")
def checkpointing_runs(toy_wan, raw_shards, tmp_path_factory):
    """Three steps of the tiny preset in this process, with gradient checkpointing on and off."""
    return {on: train(_cfg(toy_wan, raw_shards[0], tmp_path_factory.mktemp("gc"), "max_steps=3",
                           "log.checkpoint_every=0", f"gradient_checkpointing={on}")) for on in (True, False)}


def test_gradient_checkpointing_recomputes_blocks_and_trains_alike(checkpointing_runs):
    on, off = checkpointing_runs[True], checkpointing_runs[False]
    torch.testing.assert_close(on["losses"], off["losses"], rtol=1e-5, atol=1e-6)
    for result, forwards in ((on, 2), (off, 1)):  # a checkpointed block starts again in backward
        model, calls = result["transformer"], []  # (a pre-hook: the recomputation may stop early, before its end)
        hook = model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
        x, sigma, prompt = torch.randn(1, 36, 2, 8, 8), torch.tensor([0.5]), torch.zeros(1, 4, 16)
        wan.predict_velocity(model, x, sigma, prompt).square().mean().backward()
        hook.remove()
        assert len(calls) == forwards


def test_training_leaves_the_frozen_base_weights_bit_identical(checkpointing_runs, toy_wan):
    base = load_file(f"{toy_wan}/transformer/diffusion_pytorch_model.safetensors")
    model = checkpointing_runs[False]["transformer"]  # the model object that was trained, in this process
    live = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    frozen = [k for k in base if not k.startswith("patch_embedding.")]
    assert len(frozen) > 10
    for key in frozen:
        assert torch.equal(live[key], base[key]), key
    assert not torch.equal(live["patch_embedding.weight"][:, :16], base["patch_embedding.weight"])  # it trained


def test_samples_count_the_clips_that_trained(toy_wan, tmp_path):
    write_shards(tmp_path / "long", shards=1, per_shard=1, frames=9)
    write_shards(tmp_path / "short", shards=1, per_shard=1, frames=5)  # < num_frames=9: dropped from its batch
    shards = f"{tmp_path}/{{long,short}}/shards/000000.tar"
    train(_cfg(toy_wan, shards, tmp_path / "out", "max_steps=2", "data.shuffle_buffer=2", "log.checkpoint_every=0"))
    assert [m["samples"] for m in _metrics(tmp_path / "out")] == [1, 2]  # each batch of 2 kept the long clip
    assert json.loads((tmp_path / "out/checkpoints/step-00000002/meta.json").read_text())["samples"] == 2


def test_a_new_run_does_not_mix_with_an_old_runs_checkpoints(toy_wan, raw_shards, tmp_path, capsys):
    args = ["train", str(TINY), f"model.base={toy_wan}", f"data.shards={raw_shards[0]}", f"output_dir={tmp_path}",
            "log.checkpoint_every=1", "log.keep_checkpoints=1"]
    assert main(["-q", *args, "max_steps=2"]) == 0
    capsys.readouterr()
    assert main([*args, "max_steps=1"]) == 2  # would write step 1, then prune it in favour of the old step 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resume=latest" in err and "overwrite=true" in err
    assert main(["-q", *args, "max_steps=1", "overwrite=true"]) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]
    assert [m["step"] for m in _metrics(tmp_path)] == [1]


def test_checkpoints_go_to_s3_and_resume_from_there(toy_wan, raw_shards, s3_bucket, s3_env, tmp_path, monkeypatch):
    import tempfile

    from tests.conftest import S3_SECRET

    uri = f"s3://{s3_bucket}/runs/a"
    common = [f"checkpoint_uri={uri}", f"data.s3.endpoint_url={s3_env}", "log.checkpoint_every=2",
              "log.keep_checkpoints=1"]
    whole = train(_cfg(toy_wan, raw_shards[0], tmp_path / "whole", "max_steps=4", "log.checkpoint_every=2"))
    train(_cfg(toy_wan, raw_shards[0], tmp_path / "a", "max_steps=2", *common))
    fetches = tmp_path / "tmp"
    fetches.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(fetches))  # where the S3 checkpoint is downloaded to
    resumed = train(_cfg(toy_wan, raw_shards[0], tmp_path / "a", "max_steps=4", "resume=latest", *common))
    assert resumed["losses"] == whole["losses"][2:]
    assert list(fetches.iterdir()) == []  # the temporary copy is gone
    from dreamstereo.io.storage import S3Config, S3Storage

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
def test_two_ray_train_workers_read_disjoint_shards_and_resume_exactly(toy_wan, raw_shards, tmp_path, ray_session):
    from dreamstereo.training.ray_train import run_ray_training

    two = ["ray.num_workers=2", "ray.cpus_per_worker=0.5", "micro_batch_size=1", "max_steps=4",
           "log.checkpoint_every=2", "log.keep_checkpoints=0"]
    whole = tmp_path / "whole"
    assert run_ray_training(_cfg(toy_wan, raw_shards[0], whole, *two))["step"] == 4
    read = [set(json.loads((whole / "ranks" / f"rank-{r}.json").read_text())["shards_read"]) for r in (0, 1)]
    assert read[0] and read[1] and not read[0] & read[1]
    assert [m["step"] for m in _metrics(whole)] == [1, 2, 3, 4]
    # Every rank's RNG state is saved, and they differ (each rank draws its own noise).
    step2 = whole / "checkpoints" / "step-00000002"
    rngs = torch.load(step2 / "training_state.pt", weights_only=False)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["loop"], rngs[1]["loop"])
    # The empty-prompt embedding came from the driver (umT5 ran there once, in no worker).
    assert "Ray driver" in wan.load_prompt_embedding(step2 / "prompt_embedding.safetensors")[1]
    # Resumed at step 2 on 2 workers (each restores its own RNG state): the same losses as without a stop.
    resumed = tmp_path / "resumed"
    run_ray_training(_cfg(toy_wan, raw_shards[0], resumed, *two, f"resume={step2}"))
    assert [m["loss"] for m in _metrics(resumed)] == [m["loss"] for m in _metrics(whole)][2:]


@pytest.mark.slow
def test_a_setup_error_inside_a_ray_worker_is_one_line_at_the_cli(toy_wan, raw_shards, tmp_path, ray_session, capsys):
    # 4 shards for 2 workers x 3 loader processes: found when the workers build their data streams.
    code = main(["train", str(TINY), f"model.base={toy_wan}", f"data.shards={raw_shards[0]}",
                 f"output_dir={tmp_path}", "ray.num_workers=2", "ray.cpus_per_worker=0.5", "micro_batch_size=1",
                 "data.num_workers=3"])
    err = capsys.readouterr().err.strip()  # (before it: the driver's progress bar of loading umT5)
    assert code == 2 and "Traceback" not in err and "Error Snippet" not in err
    assert err.splitlines()[-1].startswith("dreamstereo train: error: 4 shard(s) for 6 data streams")


# ----------------------------------------------------------------------------------------------------
# Hostile checkpoints, data and settings (issue 10)


class _Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint file would run as the training user."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def one_step(toy_wan, raw_shards, tmp_path_factory) -> Path:
    """A committed checkpoint of one step of the tiny preset."""
    out = tmp_path_factory.mktemp("one-step")
    train(_cfg(toy_wan, raw_shards[0], out, "max_steps=1"))
    return out / "checkpoints" / "step-00000001"


def _planted_copy(checkpoint: Path, folder: Path, name: str, marker: Path, *, how: str = "pickle") -> Path:
    import pickle
    import shutil

    copy = Path(shutil.copytree(checkpoint, folder / "step-00000001"))
    if how == "torch.save":  # torch's zip format, and its older bare-pickle format
        torch.save({"optimizer": _Payload(marker)}, copy / name)
    elif how == "legacy torch.save":
        torch.save({"optimizer": _Payload(marker)}, copy / name, _use_new_zipfile_serialization=False)
    else:
        (copy / name).write_bytes(pickle.dumps({"optimizer": _Payload(marker)}))
    return copy


_READ_BY = {"training_state.pt": {"train"}, "adapter_model.safetensors": {"train", "export"},
            "prompt_embedding.safetensors": {"train", "export"}, "meta.json": {"export"},
            "adapter_config.json": {"export"}, "config.yaml": set()}


@pytest.mark.parametrize("name,how", [*((name, "pickle") for name in _READ_BY), ("training_state.pt", "torch.save"),
                                      ("training_state.pt", "legacy torch.save")])
def test_a_payload_planted_in_any_checkpoint_file_runs_nothing(one_step, toy_wan, raw_shards, tmp_path, capsys,
                                                               name, how):
    marker = tmp_path / "payload-ran"
    copy = _planted_copy(one_step, tmp_path, name, marker, how=how)
    train_code = main(["-q", "train", str(TINY), f"model.base={toy_wan}", f"data.shards={raw_shards[0]}",
                       f"output_dir={tmp_path}/out", f"resume={copy}", "max_steps=1"])  # nothing left to train
    train_err = capsys.readouterr().err.strip()
    export_code = main(["-q", "export", str(copy), "--out", str(tmp_path / "model")])
    export_err = capsys.readouterr().err.strip()
    assert not marker.exists()
    for command, code, err in (("train", train_code, train_err), ("export", export_code, export_err)):
        if command in _READ_BY[name]:  # refused with one line naming the checkpoint and the file
            assert code == 2 and len(err.splitlines()) == 1, err
            assert err.startswith(f"dreamstereo {command}: error: checkpoint {str(copy)!r}: {name} "), err
        else:  # a file this command does not read
            assert code == 0, err


def test_an_old_pickled_training_state_is_refused_with_what_to_do(one_step, toy_wan, raw_shards, tmp_path, capsys):
    """Checkpoints of earlier versions pickled numpy's RNG state: not resumed, but their weights still start
    a run through model.init_from."""
    import shutil

    copy = Path(shutil.copytree(one_step, tmp_path / "old" / "step-00000001"))
    state = torch.load(copy / "training_state.pt", weights_only=True)
    state.pop("format")
    state["rng"][0]["numpy"] = np.random.get_state()  # as rng_state() wrote it before
    torch.save(state, copy / "training_state.pt")
    args = ["train", str(TINY), f"model.base={toy_wan}", f"data.shards={raw_shards[0]}", "max_steps=1"]
    assert main([*args, f"output_dir={tmp_path}/a", f"resume={copy}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training_state.pt holds more than data" in err
    assert f"model.init_from={copy} and a new output_dir" in err
    assert main(["-q", *args, f"output_dir={tmp_path}/b", f"model.init_from={copy}"]) == 0


def test_a_damaged_shard_is_skipped_and_counted_or_stops_a_strict_run(toy_wan, raw_shards, tmp_path, capsys):
    import shutil

    (tmp_path / "shards").mkdir()
    shutil.copy(f"{raw_shards[0]}/shards/000000.tar", tmp_path / "shards")
    (tmp_path / "shards" / "000004.tar").write_bytes(np.random.default_rng(0).bytes(10_000))
    shards = f"{tmp_path}/shards/{{000000,000004}}.tar"
    args = ["train", str(TINY), f"model.base={toy_wan}", f"data.shards={shards}", "max_steps=2",
            "data.shuffle_buffer=2"]
    assert main(["-q", *args, f"output_dir={tmp_path}/a"]) == 0
    metrics = _metrics(tmp_path / "a")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["shards_skipped"] >= 1
    capsys.readouterr()
    for workers in (0, 1):  # read here, or in a DataLoader process (whose error comes back with its traceback)
        assert main(["-q", *args, f"output_dir={tmp_path}/b{workers}", "data.strict=true",
                     f"data.num_workers={workers}"]) == 2
        err = capsys.readouterr().err.strip()  # (before it: the progress bar of loading umT5)
        assert "Traceback" not in err and "DataLoader" not in err, err
        assert err.splitlines()[-1].startswith(f"dreamstereo train: error: shard {tmp_path}/shards/000004.tar "
                                               f"is not a readable tar")


@pytest.mark.parametrize("setting", ["optim.lr=nan", "optim.lr=inf", "optim.eps=nan", "flow.shift=inf"])
def test_non_finite_settings_are_refused_at_start(raw_shards, toy_wan, tmp_path, capsys, setting):
    code = main(["train", str(TINY), f"model.base={toy_wan}", f"data.shards={raw_shards[0]}",
                 f"output_dir={tmp_path}", setting])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"{setting}: must be a finite number" in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_diverging_run_stops_and_never_commits_a_non_finite_checkpoint(toy_wan, raw_shards, tmp_path, capsys):
    code = main(["train", str(TINY), f"model.base={toy_wan}", f"data.shards={raw_shards[0]}",
                 f"output_dir={tmp_path}", "optim.lr=1e30", "max_steps=6", "log.checkpoint_every=1",
                 "log.keep_checkpoints=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "not finite, stopped before the update" in err[-1] and "lower optim.lr" in err[-1]

    def strict(token):
        raise ValueError(f"{token} in metrics.jsonl")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=strict) for line in lines]
    assert records[-1]["stopped"] and None in (records[-1]["loss"], records[-1]["grad_norm"])  # NaN -> null
    for folder in sorted((tmp_path / "checkpoints").iterdir()):
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values()), folder.name
    assert [int(f.name[5:]) for f in sorted((tmp_path / "checkpoints").iterdir())] == [
        r["step"] for r in records[:-1]]  # every step before the stop, none after


def test_a_checkpoint_uri_that_is_a_file_is_refused_before_training(toy_wan, raw_shards, tmp_path, capsys):
    (tmp_path / "ckpt").write_text("a file")
    code = main(["train", str(TINY), f"model.base={toy_wan}", f"data.shards={raw_shards[0]}",
                 f"output_dir={tmp_path}/out", f"checkpoint_uri={tmp_path}/ckpt"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"'{tmp_path}/ckpt' is a file" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused before the first step, not at the first save


def test_a_resumed_run_restores_a_step_its_killed_save_left_aside(one_step, toy_wan, raw_shards, tmp_path):
    import shutil

    store = tmp_path / "out" / "checkpoints"
    shutil.copytree(one_step, store / ".step-00000001.old-999999")  # killed between the two renames
    shutil.copytree(one_step, store / ".step-00000002.tmp-999998")  # killed while copying
    result = train(_cfg(toy_wan, raw_shards[0], tmp_path / "out", "max_steps=2", "resume=latest"))
    assert result["step"] == 2 and len(result["losses"]) == 1  # resumed from the restored step 1
    assert sorted(p.name for p in store.iterdir()) == ["step-00000001", "step-00000002"]
