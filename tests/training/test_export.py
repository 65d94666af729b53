"""`dreamstereo export` (training/export.py): the merged model equals base + LoRA, the folder stands alone,
the dtype option, the base option, checkpoints on S3, and what is refused (uncommitted or damaged
checkpoints, a missing base) with the documented errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamstereo.cli import main
from dreamstereo.models import wan_inpaint as wan
from dreamstereo.training.checkpoint import CheckpointError
from dreamstereo.training.export import export_model
from tests.conftest import run_with_file_size_limit

RANK, ALPHA = 4, 12.0  # LoRA scale alpha / rank = 3: an export that ignored alpha or rank would not match
TARGETS = ["attn1.to_q", "attn1.to_v", "ffn.net.0.proj"]


def _files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in Path(folder).rglob("*") if p.is_file()}


def _adapter_model(base, state=None):
    """The base transformer with the test adapter (and ``state`` loaded into it), in eval mode."""
    model = wan.load_inpaint_model(base)
    wan.add_lora(model, rank=RANK, alpha=ALPHA, targets=TARGETS)
    if state is not None:
        wan.load_trainable_state_dict(model, state)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(toy_wan, tmp_path_factory) -> Path:
    """A committed checkpoint folder with known weights: random LoRA A and B (B is not zero, so the adapter
    changes the model), a random patch embedding, rank 4 / alpha 12 on three target modules, a prompt
    embedding, meta.json naming the base. The files export reads, in the layout train writes."""
    folder = tmp_path_factory.mktemp("export-ckpt") / "step-00000007"
    folder.mkdir()
    model = _adapter_model(toy_wan)
    generator = torch.Generator().manual_seed(0)
    state = {k: 0.1 * torch.randn(v.shape, generator=generator) for k, v in wan.trainable_state_dict(model).items()}
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA,
                                                            "target_modules": TARGETS}))
    wan.save_prompt_embedding(folder / wan.PROMPT_EMBEDDING_FILE, torch.randn(1, 8, 16, generator=generator),
                              source="test")
    (folder / "meta.json").write_text(json.dumps({"step": 7, "base": str(toy_wan)}))  # the commit marker
    return folder


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    return export_model(str(checkpoint), tmp_path_factory.mktemp("exported") / "model")


def _velocity(model, prompt):
    x, sigma = torch.randn(1, 36, 2, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.7])
    with torch.no_grad():
        return wan.predict_velocity(model, x, sigma, prompt)


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


def test_the_merged_transformer_equals_base_plus_lora_on_a_forward_pass(exported, checkpoint, toy_wan):
    merged = wan.load_inpaint_model(exported).eval()
    prompt, source = wan.resolve_prompt_embedding(exported, text_dim=16)  # the stored one
    stored, _ = wan.load_prompt_embedding(checkpoint / wan.PROMPT_EMBEDDING_FILE)
    assert source == "test" and torch.equal(prompt, stored)
    state = load_file(str(checkpoint / "adapter_model.safetensors"))
    expected = _velocity(_adapter_model(toy_wan, state), prompt)
    torch.testing.assert_close(_velocity(merged, prompt), expected, rtol=1e-4, atol=1e-5)
    # ... and the adapter matters: the base with only the patch embedding differs by far more than that.
    base_only = wan.load_inpaint_model(toy_wan).eval()
    with torch.no_grad():
        base_only.patch_embedding.weight.copy_(state["patch_embedding.weight"])
        base_only.patch_embedding.bias.copy_(state["patch_embedding.bias"])
    assert (_velocity(base_only, prompt) - expected).abs().max() > 1e-2
    assert not any("lora" in k for k in merged.state_dict())
    assert merged.config.in_channels == wan.INPAINT_IN_CHANNELS


def test_the_folder_stands_alone_and_says_where_it_came_from(exported, checkpoint, toy_wan):
    assert sorted(p.name for p in exported.iterdir()) == [
        "dreamstereo_model.json", "prompt_embedding.safetensors", "transformer", "vae"]
    assert not list(exported.rglob("*.bin")) and list((exported / "transformer").glob("*.safetensors"))
    vae = {k: v for k, v in _files(toy_wan).items() if k.startswith("vae/")}
    assert vae and {k: v for k, v in _files(exported).items() if k.startswith("vae/")} == vae  # copied as is
    assert _files(exported)[wan.PROMPT_EMBEDDING_FILE] == _files(checkpoint)[wan.PROMPT_EMBEDDING_FILE]
    info = json.loads((exported / wan.MODEL_INFO_FILE).read_text())
    assert {k: info[k] for k in ("checkpoint", "step", "base", "lora_rank", "lora_alpha", "in_channels", "dtype")} \
        == {"checkpoint": str(checkpoint), "step": 7, "base": str(toy_wan), "lora_rank": RANK, "lora_alpha": ALPHA,
            "in_channels": 36, "dtype": "float32"}
    wan.load_vae(exported)  # the copied VAE loads from the exported folder itself


def test_the_base_is_left_untouched_by_an_export(checkpoint, toy_wan, tmp_path):
    before = _files(toy_wan)
    export_model(str(checkpoint), tmp_path / "model")
    assert _files(toy_wan) == before


def test_an_export_is_written_whole_or_not_at_all_and_replaces_only_an_earlier_export(checkpoint, exported,
                                                                                      tmp_path, capsys):
    # a folder of other things is refused before any work, untouched
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["-q", "export", str(checkpoint), "--out", str(tmp_path / "mine")]) == 2
    assert "exists and is not an exported model (no dreamstereo_model.json)" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    # a rerun replaces the earlier export's files (a file of the user's beside them stays)
    out = shutil.copytree(exported, tmp_path / "model")
    (out / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"an older export")
    (out / "NOTES.md").write_text("mine")
    export_model(str(checkpoint), out)
    assert _files(out) == {**_files(exported), "NOTES.md": hashlib.sha256(b"mine").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "model"]
    # a disk that refuses the writes (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC) half-way through: one line
    # naming the output; a new output is not made, an earlier export is left as it was, no temporary folder stays
    before = _files(out)
    for target in (tmp_path / "full" / "model", out):
        done = run_with_file_size_limit("from dreamstereo.cli import main\n"
                                        "raise SystemExit(main(['-q', 'export', sys.argv[1], '--out', sys.argv[2]]))",
                                        str(checkpoint), str(target), limit=1 << 16)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip() == (f"dreamstereo export: error: cannot write the exported model '{target}': "
                                       "Error while serializing: I/O error: File too large (os error 27)"), done.stderr
    assert list((tmp_path / "full").iterdir()) == []
    # what an export killed with -9 left (a staging folder whose lock no process holds) is no content: a rerun
    # goes on and clears it
    killed = tmp_path / "killed"
    (killed / ".staging-x1y2").mkdir(parents=True)
    (killed / ".staging-x1y2" / ".lock").write_text("")
    export_model(str(checkpoint), killed)
    assert _files(killed) == _files(exported) and not [p for p in killed.iterdir() if p.name.startswith(".")]
    assert _files(out) == before and not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_dtype_option_is_the_float32_export_rounded_to_that_dtype(exported, checkpoint, tmp_path, dtype):
    out = export_model(str(checkpoint), tmp_path / "model", dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    assert json.loads((out / wan.MODEL_INFO_FILE).read_text())["dtype"] == name
    weights = {k: v for f in (out / "transformer").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    full = {k: v for f in (exported / "transformer").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert set(weights) == set(full)
    float_weights = [k for k, v in full.items() if v.is_floating_point() and v.dtype == torch.float32]
    assert float_weights
    for key in float_weights:  # the float32 merge, then one cast (not a merge in low precision)
        saved = weights[key]
        assert saved.dtype in (dtype, torch.float32), key  # (float32 allowed: modules diffusers keeps in it)
        assert torch.equal(saved, full[key].to(saved.dtype)), key
    assert sum(weights[k].dtype == dtype for k in float_weights) > len(float_weights) // 2


def test_base_overrides_the_one_recorded_in_the_checkpoint(checkpoint, exported, toy_wan, tmp_path):
    copy = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    (copy / "meta.json").write_text(json.dumps({"step": 7, "base": str(tmp_path / "moved-away")}))
    with pytest.raises(wan.WeightsError, match="moved-away' does not exist"):
        export_model(str(copy), tmp_path / "refused")
    out = export_model(str(copy), tmp_path / "model", base=str(toy_wan))
    assert _files(out / "transformer") == _files(exported / "transformer")  # the same merge, byte for byte
    (copy / "meta.json").write_text(json.dumps({"step": 7}))  # no base recorded and none given
    with pytest.raises(wan.WeightsError, match="records no base model: give --base"):
        export_model(str(copy), tmp_path / "refused")


def test_an_uncommitted_or_missing_checkpoint_is_refused_before_anything_is_written(checkpoint, tmp_path, capsys):
    from dreamstereo.io.storage import StorageError

    copy = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    (copy / "meta.json").unlink()  # a save that never committed
    for uri in (copy, tmp_path / "no-such-checkpoint"):
        with pytest.raises(StorageError, match=r"is not a committed checkpoint folder \(no meta.json\)"):
            export_model(str(uri), tmp_path / "model")
        assert not (tmp_path / "model").exists()
    assert main(["-q", "export", str(copy), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"dreamstereo export: error: {str(copy)!r} is not a committed")


@pytest.mark.parametrize("damage, needle", [
    ("no-adapter", "adapter_model.safetensors is missing"),
    ("no-prompt", "prompt_embedding.safetensors is missing"),
    ("no-rank", "adapter_config.json lacks an integer \"r\" and a number \"lora_alpha\""),
    ("text-alpha", "adapter_config.json lacks an integer \"r\" and a number \"lora_alpha\""),
    ("bool-rank", "adapter_config.json lacks an integer \"r\" and a number \"lora_alpha\""),
    ("meta-list", "meta.json holds a JSON list, not an object"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(checkpoint, tmp_path, damage, needle):
    copy = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    config = json.loads((copy / "adapter_config.json").read_text())
    if damage == "no-adapter":
        (copy / "adapter_model.safetensors").unlink()
    elif damage == "no-prompt":
        (copy / wan.PROMPT_EMBEDDING_FILE).unlink()
    elif damage == "no-rank":
        (copy / "adapter_config.json").write_text(json.dumps({**config, "r": None}))
    elif damage == "text-alpha":
        (copy / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": "12"}))
    elif damage == "bool-rank":  # JSON true is a Python int subclass: not a rank
        (copy / "adapter_config.json").write_text(json.dumps({**config, "r": True}))
    else:
        (copy / "meta.json").write_text("[]")
    with pytest.raises(CheckpointError) as info:
        export_model(str(copy), tmp_path / "model")
    assert str(info.value) == f"checkpoint {str(copy)!r}: {needle}"
    assert not (tmp_path / "model").exists()  # every file is checked before any model is built or written


def test_an_adapter_that_does_not_fit_its_config_is_one_line_at_the_cli(checkpoint, tmp_path, capsys):
    """r says 16, the tensors are rank 4: a CheckpointError naming both files, exit 2, no traceback."""
    copy = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors does not fit its adapter_config.json "
                                              r"\(r=16"):
        export_model(str(copy), tmp_path / "model")
    assert main(["-q", "export", str(copy), "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit its adapter_config.json" in err
    assert not (tmp_path / "model").exists()


def test_a_checkpoint_on_s3_exports_the_same_model(checkpoint, exported, s3_bucket, s3_env, tmp_path):
    from dreamstereo.io.storage import S3Config
    from dreamstereo.training.checkpoint import CheckpointStore

    s3 = S3Config(endpoint_url=s3_env)
    downloads = set(Path(tempfile.gettempdir()).glob("dreamstereo-ckpt-*"))
    uri = CheckpointStore(f"s3://{s3_bucket}/run/checkpoints", s3).save(7, checkpoint)
    out = export_model(uri, tmp_path / "model", s3=s3)
    assert _files(out / "transformer") == _files(exported / "transformer")
    assert json.loads((out / wan.MODEL_INFO_FILE).read_text())["checkpoint"] == uri
    assert set(Path(tempfile.gettempdir()).glob("dreamstereo-ckpt-*")) <= downloads  # its download is deleted
