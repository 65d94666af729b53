"""Checkpoint stores: one run per store, same-step overwrites, temporary S3 copies; loop helpers that
guard the step (gradient norm without gradients, weight decay groups, shared checkpoint folders)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dreamstereo.io.storage import S3Config, StorageError
from dreamstereo.training import checkpoint as ckpt
from dreamstereo.training.train import TrainSetupError, check_store_shared, clip_grads
from tests.conftest import run_with_file_size_limit


def _folder(path: Path, tag: str, names=("adapter_model.safetensors", "training_state.pt")) -> Path:
    path.mkdir(parents=True)
    for name in names:
        (path / name).write_text(f"{tag} {name}")
    (path / ckpt.META_FILE).write_text(json.dumps({"tag": tag}))
    return path


def _read(store: ckpt.CheckpointStore, step: int) -> dict:
    with ckpt.fetched(store.uri_of(step), store.s3) as folder:
        return {p.name: p.read_text() for p in folder.iterdir()}


def test_a_fresh_run_refuses_a_store_with_committed_checkpoints(tmp_path):
    store = ckpt.CheckpointStore(str(tmp_path / "checkpoints"))
    ckpt.check_fresh_start(store, resume=None, overwrite=False)  # empty: fine
    store.save(4, _folder(tmp_path / "a", "old"))
    with pytest.raises(ckpt.CheckpointConflict, match="steps 4..4.*resume=latest.*overwrite=true.*new output_dir"):
        ckpt.check_fresh_start(store, resume=None, overwrite=False)
    ckpt.check_fresh_start(store, resume="latest", overwrite=False)
    ckpt.check_fresh_start(store, resume=None, overwrite=True)
    store.clear()
    assert store.steps() == [] and not any((tmp_path / "checkpoints").iterdir())


def test_a_same_step_save_replaces_the_old_checkpoint_locally(tmp_path):
    store = ckpt.CheckpointStore(str(tmp_path / "checkpoints"))
    store.save(2, _folder(tmp_path / "a", "old", names=("adapter_model.safetensors", "stale.txt")))
    store.save(2, _folder(tmp_path / "b", "new"))
    assert _read(store, 2) == {"adapter_model.safetensors": "new adapter_model.safetensors",
                               "training_state.pt": "new training_state.pt", "meta.json": '{"tag": "new"}'}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]  # nothing left aside


def test_a_local_save_on_a_full_disk_names_the_checkpoint_and_keeps_the_old_one(tmp_path):
    store = ckpt.CheckpointStore(str(tmp_path / "checkpoints"))
    store.save(2, _folder(tmp_path / "a", "old"))
    big = _folder(tmp_path / "b", "new")
    (big / "training_state.pt").write_bytes(os.urandom(1 << 16))
    done = run_with_file_size_limit("from pathlib import Path\n"
                                    "from dreamstereo.io.storage import UnwritableStorageError\n"
                                    "from dreamstereo.training.checkpoint import CheckpointStore\n"
                                    "try:\n"
                                    "    CheckpointStore(sys.argv[1]).save(2, Path(sys.argv[2]))\n"
                                    "except UnwritableStorageError as exc:\n"
                                    "    print(exc)\n", store.uri, str(big), limit=4096)
    assert done.returncode == 0 and done.stdout.strip() == (
        f"cannot write checkpoint '{store.uri}/step-00000002': File too large [EFBIG]"), done.stdout + done.stderr
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000002"]  # no staging folder left
    assert _read(store, 2)["meta.json"] == '{"tag": "old"}'  # the committed one is untouched


def test_a_same_step_save_on_s3_uncommits_the_old_one_first(s3_bucket, s3_env, tmp_path):
    store = ckpt.CheckpointStore(f"s3://{s3_bucket}/run", S3Config(endpoint_url=s3_env))
    store.save(2, _folder(tmp_path / "a", "old", names=("adapter_model.safetensors", "stale.txt")))
    # A save that dies after its first upload (a file vanished: the link points nowhere).
    broken = _folder(tmp_path / "b", "new", names=("adapter_model.safetensors",))
    os.symlink(tmp_path / "nowhere", broken / "training_state.pt")
    with pytest.raises(OSError):
        store.save(2, broken)
    assert store.steps() == []  # half old, half new is not a committed checkpoint
    with pytest.raises(StorageError, match="not a committed checkpoint"):
        ckpt.check_committed(store.uri_of(2), store.s3)
    store.save(2, _folder(tmp_path / "c", "new"))
    assert store.steps() == [2]
    assert _read(store, 2) == {"adapter_model.safetensors": "new adapter_model.safetensors",
                               "training_state.pt": "new training_state.pt", "meta.json": '{"tag": "new"}'}


def test_an_s3_checkpoint_is_fetched_to_a_temporary_folder_that_is_deleted(s3_bucket, s3_env, tmp_path):
    store = ckpt.CheckpointStore(f"s3://{s3_bucket}/run", S3Config(endpoint_url=s3_env))
    store.save(1, _folder(tmp_path / "a", "one"))
    with ckpt.fetched(store.uri_of(1), store.s3) as folder:
        assert (folder / "meta.json").is_file() and folder != tmp_path / "a"
    assert not folder.exists()
    with ckpt.fetched(str(tmp_path / "a"), None) as local:  # a local checkpoint is used where it is
        assert local == tmp_path / "a"
    assert local.exists()


def test_grad_norm_without_clipping_skips_parameters_without_a_gradient():
    used, unused = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    used.grad = torch.tensor([3.0, 4.0])
    assert clip_grads([used, unused], 0.0) == pytest.approx(5.0)
    assert clip_grads([unused], 0.0) == 0.0
    assert clip_grads([used, unused], 1.0) == pytest.approx(5.0) and float(used.grad.norm()) == pytest.approx(1.0)


def test_patch_embedding_trains_without_weight_decay(toy_wan):
    from dreamstereo.models import wan_inpaint as wan
    from dreamstereo.training.config import OptimConfig, TrainConfig
    from dreamstereo.training.train import make_optimizer

    model = wan.load_inpaint_model(toy_wan)
    wan.add_lora(model, rank=4, alpha=4)
    optimizer = make_optimizer(model, TrainConfig(optim=OptimConfig(weight_decay=0.1)))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    embedding = {id(model.patch_embedding.weight), id(model.patch_embedding.bias)}
    assert {id(p) for p in no_decay["params"]} == embedding
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(decay["params"]) == len(trainable) - 2 and all(id(p) not in embedding for p in decay["params"])


def test_a_local_checkpoint_folder_must_be_seen_by_every_node(tmp_path):
    local = ckpt.CheckpointStore(str(tmp_path))
    check_store_shared(local, ["node-a", "node-a"], [True, False])  # one node: the probe is not even needed
    check_store_shared(local, ["node-a", "node-b"], [True, True])  # a shared file system
    with pytest.raises(TrainSetupError, match=r"ranks \[1\].*2 nodes.*s3:// checkpoint_uri.*shared file system"):
        check_store_shared(local, ["node-a", "node-b"], [True, False])


class _Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_rng_states_round_trip_exactly_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    from dreamstereo.training.train import rng_state, set_rng_state

    random.seed(5)
    np.random.seed(7)
    np.random.standard_normal()  # numpy now holds a cached Gaussian: part of its state
    generator = torch.Generator().manual_seed(3)
    torch.save({"rng": [rng_state(generator)]}, tmp_path / "state.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), np.random.randint(1 << 30),
                torch.rand(2).tolist(), torch.rand(2, generator=generator).tolist())
    saved = torch.load(tmp_path / "state.pt", weights_only=True)["rng"][0]  # tensors and plain values only
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(saved, generator)
    assert (random.random(), np.random.standard_normal(3).tolist(), np.random.randint(1 << 30),
            torch.rand(2).tolist(), torch.rand(2, generator=generator).tolist()) == expected


@pytest.mark.parametrize("planted", ["pickle", "torch.save", "legacy torch.save", "old numpy state", "random bytes"])
def test_a_training_state_that_is_not_plain_data_is_refused_unread(tmp_path, planted):
    import pickle

    import numpy as np

    folder, marker = tmp_path / "step-00000001", tmp_path / "payload-ran"
    folder.mkdir()
    path = folder / ckpt.STATE_FILE
    if planted == "pickle":
        path.write_bytes(pickle.dumps({"optimizer": _Payload(marker)}))
    elif planted == "torch.save":
        torch.save({"format": ckpt.STATE_FORMAT, "optimizer": _Payload(marker)}, path)
    elif planted == "legacy torch.save":  # torch's older format: a bare pickle after a magic number
        torch.save({"optimizer": _Payload(marker)}, path, _use_new_zipfile_serialization=False)
    elif planted == "old numpy state":  # what dreamstereo wrote before: numpy's RNG state pickled
        torch.save({"optimizer": {}, "scheduler": {}, "step": 1, "samples": 2, "data": {},
                    "rng": [{"numpy": np.random.get_state()}]}, path)
    else:
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_training_state(folder, str(folder))
    message = str(info.value)
    assert not marker.exists()
    assert len(message.splitlines()) == 1 and message.startswith(f"checkpoint {str(folder)!r}: training_state.pt ")
    assert f"model.init_from={folder} and a new output_dir" in message


def test_leftovers_of_killed_saves_are_tidied_and_an_orphaned_old_step_restored(tmp_path):
    root = tmp_path / "checkpoints"
    store = ckpt.CheckpointStore(str(root))
    store.save(1, _folder(tmp_path / "a", "one"))
    _folder(root / ".step-00000002.tmp-4242", "partial")  # killed while copying
    _folder(root / ".step-00000001.old-4243", "stale")  # killed after the new step 1 was in place
    _folder(root / ".step-00000003.old-4244", "three")  # killed between the renames: the only step 3
    (root / "step-00000003").mkdir()  # ... next to an uncommitted step-3 folder
    done = ckpt.clean_leftovers(store)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000003"]
    assert store.steps() == [1, 3] and _read(store, 3)["meta.json"] == '{"tag": "three"}'
    assert _read(store, 1)["meta.json"] == '{"tag": "one"}'
    assert len(done) == 3 and any(line.startswith("restored step-00000003") for line in done)


def test_a_checkpoint_location_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ckpt.CheckpointError, match=r"'.*/file' is a file: give checkpoint_uri=DIR"):
        ckpt.check_location(ckpt.CheckpointStore(str(tmp_path / "file")))
    with pytest.raises(ckpt.CheckpointError, match=r"'.*/file/checkpoints' lies under '.*/file', which is a file"):
        ckpt.check_location(ckpt.CheckpointStore(str(tmp_path / "file" / "checkpoints")))
    ckpt.check_location(ckpt.CheckpointStore(str(tmp_path / "new" / "checkpoints")))  # made at the first save


def test_uncommitted_step_prefixes_on_s3_are_deleted_at_start(s3_bucket, s3_env, tmp_path):
    store = ckpt.CheckpointStore(f"s3://{s3_bucket}/run", S3Config(endpoint_url=s3_env))
    store.save(1, _folder(tmp_path / "a", "one"))
    store.storage.upload_file("step-00000002/adapter_model.safetensors",  # a save killed after one upload
                              tmp_path / "a" / "adapter_model.safetensors")
    store.storage.write_bytes("notes.txt", b"not a checkpoint: left alone")
    assert ckpt.clean_leftovers(store) == ["deleted step-00000002/ (uncommitted: left by a save that did not finish)"]
    assert sorted(store.storage.list("")) == ["notes.txt", "step-00000001/adapter_model.safetensors",
                                              "step-00000001/meta.json", "step-00000001/training_state.pt"]
