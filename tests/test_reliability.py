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
