"""Issue #20: nothing lost, nothing silently wrong (loading strictness, atomic writes, train runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from impure_hf._utils import CorruptFileError, atomic_path, atomic_write_json, read_json
from impure_hf.hub import load_purifier


# ---------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = tiny_model(seed=7).eval()
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(folder)
    return folder, model


def _edit_weights(folder: Path, out: Path, drop=(), add=None) -> Path:
    import shutil

    shutil.copytree(folder, out)
    weights = load_file(str(out / "model.safetensors"))
    for key in drop:
        del weights[key]
    weights.update(add or {})
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_missing_weight_is_named(saved, tmp_path):
    folder, model = saved
    broken = _edit_weights(folder, tmp_path / "broken", drop=["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match=r"missing from the checkpoint: blocks\.0\.attn\.qkv\.weight"):
        load_purifier(str(broken))
    # the explicit opt-in loads it; everything but the missing tensor equals the saved model
    loaded = load_purifier(str(broken), allow_missing_weights=True)
    ref, got = model.state_dict(), loaded.state_dict()
    assert not torch.equal(ref["blocks.0.attn.qkv.weight"], got["blocks.0.attn.qkv.weight"])
    assert all(torch.equal(ref[k], got[k]) for k in ref if k != "blocks.0.attn.qkv.weight")


def test_unexpected_weight_is_named(saved, tmp_path):
    folder, _ = saved
    broken = _edit_weights(folder, tmp_path / "extra", add={"blocks.9.extra.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"unknown to the model: blocks\.9\.extra\.weight"):
        load_purifier(str(broken))


def test_intact_folder_loads_exactly(saved):
    folder, model = saved
    loaded = load_purifier(str(folder))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_mistyped_preset_names_the_presets():
    with pytest.raises(ValueError, match=r"impure-vit-b-typo.*impure-vit-tiny"):
        load_purifier("impure-vit-b-typo")


# ---------------------------------------------------------------------------------- atomic writes
def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as temporary:
            temporary.write_text('{"step": 2')  # half written, then the process "dies"
            raise RuntimeError("killed")
    assert read_json(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left behind


def test_corrupt_json_is_named(tmp_path):
    path = tmp_path / "cells" / "x.json"
    path.parent.mkdir()
    path.write_text('{"accuracy": 0.')
    with pytest.raises(CorruptFileError, match=str(path)):
        read_json(path)


# ---------------------------------------------------------------------------------- training runs
def _run_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _steps(folder: Path) -> list[int]:
    """global_step of each complete checkpoint, oldest first."""
    import json

    found = sorted((folder / "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))
    return [json.loads((p / "trainer_state.json").read_text())["global_step"] for p in found]


def test_train_refuses_a_previous_run_and_overwrite_replaces_it(tmp_path):
    from test_train import config, pair_dataset

    from impure_hf.cli import main as cli_main
    from impure_hf.train import train

    data = pair_dataset(4)
    settings = dict(max_steps=2, save_steps=1, total_limit=1, eval_split=None)
    train(config(tmp_path, **settings), tiny_model(), data)
    run = tmp_path / "run"
    before = _run_files(run)
    assert _steps(run) == [2]  # total_limit 1: only the newest checkpoint
    with pytest.raises(FileExistsError, match=r"previous run \(checkpoints.*--resume latest.*--overwrite-output-dir"):
        train(config(tmp_path, **settings), tiny_model(seed=1), data)
    assert cli_main(["train", "--output-dir", str(run), "--report-to", "none"]) == 2
    assert _run_files(run) == before  # nothing was touched
    # a stale checkpoint of the old run must not survive beside the new run's
    (run / "checkpoints" / "checkpoint_7").mkdir()
    (run / "checkpoints" / "checkpoint_7" / "trainer_state.json").write_text('{"global_step": 99}')
    train(config(tmp_path, overwrite_output_dir=True, **settings, seed=4), tiny_model(seed=1), data)
    assert _steps(run) == [2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint_1"]  # numbering restarted
    assert _run_files(run)["model.safetensors"] != before["model.safetensors"]


def test_kill_during_checkpoint_save_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """--total-limit 1 and a save cut short: the previous checkpoint survives and resume continues exactly."""
    from accelerate import Accelerator
    from test_train import config, pair_dataset

    from impure_hf.train import train

    data = pair_dataset(4)
    settings = dict(max_steps=2, save_steps=1, total_limit=1, eval_split=None)
    straight = train(config(tmp_path, "straight", **settings), tiny_model(), data)

    original, calls = Accelerator.save_state, []

    def killed_on_second_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        result = original(self, output_dir, **kwargs)  # model and optimizer written ...
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # ... but the trainer state never is
        return result

    monkeypatch.setattr(Accelerator, "save_state", killed_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, "killed", **settings), tiny_model(), data)
    monkeypatch.undo()
    run = tmp_path / "killed"
    assert _steps(run) == [1]  # the old checkpoint was not rotated away before the new one was complete
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == [".checkpoint_1.tmp"]
    resumed = train(config(tmp_path, "killed", resume="latest", **settings), tiny_model(seed=9), data)
    assert _steps(run) == [2]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # the leftover is gone
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
