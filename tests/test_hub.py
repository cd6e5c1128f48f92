"""The two doors (torch.hub, transformers remote code from the HF cache), publishing, the model card.

Everything runs offline: the torch.hub cache and the HF cache are laid out the way a download
leaves them, and the network is refused where a call could reach for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.error
from pathlib import Path

import pytest
import torch
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
from huggingface_hub.repocard_data import model_index_to_eval_results

import impure_hf
from impure_hf import ImpureConfig, ImpureModel
from impure_hf.cli import main as cli_main
from impure_hf.loading import HUB_REPO_IDS, load_purifier
from impure_hf.publishing import (
    GITHUB_REPO,
    REMOTE_CODE_FILES,
    add_to_hf_cache,
    check_hub_folder,
    load_eval_results,
    validate_model_card,
)

from conftest import real_photos, tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["impure_vit_b", "impure_vit_b_release", "impure_vit_tiny", "purified_classifier"]


def _purified(model, x, seed=3):
    return model.eval()(x, generator=torch.Generator().manual_seed(seed)).purified_pixel_values


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, ImpureModel]:
    """A saved (tiny, perturbed so nothing is trivial) model folder."""
    model = tiny_model(seed=5).eval()
    folder = tmp_path_factory.mktemp("source") / "model"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def hub_folder(source, tmp_path_factory) -> Path:
    folder, _ = source
    out = tmp_path_factory.mktemp("publish") / "impure-vit-tiny"
    assert cli_main(["publish", str(folder), "--repo-id", HUB_REPO_IDS["impure-vit-tiny"], "--dry-run", "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------------- publish
def test_publish_dry_run_builds_a_complete_pickle_free_folder(hub_folder, source):
    names = {p.name for p in hub_folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", *REMOTE_CODE_FILES} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_impure.ImpureConfig",
        "AutoModel": "modeling_impure.ImpureModel",
        "AutoImageProcessor": "image_processing_impure.ImpureImageProcessor",
    }
    side = source[1].config.image_size
    saved = json.loads((hub_folder / "preprocessor_config.json").read_text())
    assert (saved["crop_size"], saved["size"]) == ({"height": side, "width": side}, {"shortest_edge": side})
    check_hub_folder(hub_folder)
    card = validate_model_card(hub_folder / "README.md")
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "image-to-image"
    text = card.text
    for needed in ("## Intended use", "## How to load", "trust_remote_code=True", "torch.hub.load", "## Training data",
                   "## Results", "## Limitations", "stochastic", "adaptive", "## Citation", "2311.15339"):
        assert needed in text, needed


def test_folder_check_rejects_pickles_and_package_imports(hub_folder, tmp_path):
    bad = tmp_path / "pickle"
    shutil.copytree(hub_folder, bad)
    torch.save({"w": torch.zeros(1)}, bad / "extra_state.data")  # a pickle whatever its name
    with pytest.raises(ValueError, match="extra_state.data"):
        check_hub_folder(bad)
    bad = tmp_path / "imports"
    shutil.copytree(hub_folder, bad)
    code = (bad / "modeling_impure.py").read_text()
    (bad / "modeling_impure.py").write_text(code.replace("from .configuration_impure import", "from impure_hf.configuration_impure import"))
    with pytest.raises(ValueError, match="impure_hf"):
        check_hub_folder(bad)


# ---------------------------------------------------------------------------------- model card
def _cell(defence, threat_model, attack, accuracy, std=0.0, repeats=1, **settings):
    """One cell of `impure evaluate`'s results.json (impure_hf.evaluate._Evaluation._assemble)."""
    return {"classifier": "efficientnet_lite0", "threat_model": threat_model, "attack": attack, "defence": defence,
            "num_images": 17, "repeats": repeats, "accuracy_mean": accuracy, "accuracy_std": std, "stochastic": repeats > 1,
            **settings}


PGD = dict(norm="Linf", eps=16 / 255, eps_255=16.0, steps=10, eot_samples=4)


def test_card_carries_eval_results_per_threat_model(source, tmp_path):
    folder, _ = source
    cells = [
        _cell("none", None, "clean", 100.0),
        _cell("IMPure (impure-vit-tiny)", None, "clean", 70.6, std=2.9, repeats=3),
        _cell("none", "black-box", "pgd", 0.0, **PGD),
        _cell("jpeg", "black-box", "pgd", 23.5, **PGD),
        _cell("IMPure (impure-vit-tiny)", "black-box", "pgd", 52.9, std=5.9, repeats=3, **PGD),
        _cell("IMPure (impure-vit-tiny)", "white-box", "pgd-eot", 5.9, std=0.0, repeats=3, **PGD),
    ]
    results = {"cells": cells, "config": {"data": "foolbox ImageNet photos", "purifier": "IMPure (impure-vit-tiny)"}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / "README.md"
    assert cli_main(["card", str(folder), "--repo-id", "impure-hf/impure-vit-tiny", "--out", str(out),
                     "--eval-results", str(tmp_path / "results.json"), "--training-notes", "Trained on 3 photos."]) == 0
    card = validate_model_card(out)
    name, index = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "impure-vit-tiny"
    # only this model's cells become model-index entries; each keeps its threat model and settings
    assert sorted((r.metric_args["threat_model"], r.metric_args["attack"], r.metric_value) for r in index) == [
        ("black-box", "pgd", 52.9), ("none (clean images)", "clean", 70.6), ("white-box", "pgd-eot", 5.9)]
    assert all(r.metric_type == "accuracy" and r.dataset_name == "foolbox ImageNet photos" for r in index)
    assert next(r for r in index if r.metric_args["attack"] == "pgd-eot").metric_args["eot_samples"] == 4
    text = card.text
    assert "**black-box**\n" in text and "**white-box**\n" in text and "52.90 ± 5.90" in text
    assert "| efficientnet_lite0 | pgd | Linf | 16/255 | 10 | - | 17 | jpeg | 23.50 |" in text  # no EOT in black-box
    assert "Trained on 3 photos." in text and "white-box adaptive numbers above" in text


def test_plain_result_rows_with_fractions_are_read(tmp_path):
    rows = [{"defence": "IMPure", "attack": "fgsm", "threat_model": "black-box", "accuracy": 0.5, "std": 0.1, "repeats": 3}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (row,) = load_eval_results(tmp_path / "rows.json")
    assert (row["accuracy"], row["std"], row["threat_model"]) == (50.0, 10.0, "black-box")


def test_card_validation_fails_on_bad_metadata(hub_folder):
    good = (hub_folder / "README.md").read_text()
    with pytest.raises(ValueError, match="license"):
        validate_model_card(good.replace("license: apache-2.0\n", ""))
    broken_index = good.replace("---\n", "---\nmodel-index:\n- name: x\n  results:\n  - task: {type: image-classification}\n"
                                          "    dataset: {type: d, name: D}\n    metrics:\n    - {type: accuracy, value: high}\n", 1)
    with pytest.raises(ValueError, match="non-numeric"):
        validate_model_card(broken_index)


def test_eval_rows_without_threat_model_are_refused(source, tmp_path):
    (tmp_path / "r.json").write_text(json.dumps([{"attack": "pgd", "accuracy": 0.5}]))
    with pytest.raises(ValueError, match="threat_model"):
        cli_main(["card", str(source[0]), "--repo-id", "a/b", "--out", str(tmp_path / "c.md"), "--eval-results", str(tmp_path / "r.json")])


# ---------------------------------------------------------------------------------- door 1: transformers
def test_hf_cache_layout_matches_huggingface_hub(hub_folder, tmp_path):
    snapshot = add_to_hf_cache(hub_folder, "impure-hf/impure-vit-tiny", cache_dir=tmp_path)
    info = scan_cache_dir(tmp_path)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "impure-hf/impure-vit-tiny" and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.refs == frozenset({"main"}) and revision.snapshot_path == snapshot
    assert {f.file_name for f in revision.files} == {p.name for p in hub_folder.iterdir()}
    for f in revision.files:  # pointers resolve to blobs with the original content
        assert f.blob_path.read_bytes() == (hub_folder / f.file_name).read_bytes()
        assert f.file_path.is_symlink()
    path = try_to_load_from_cache("impure-hf/impure-vit-tiny", "model.safetensors", cache_dir=tmp_path)
    assert Path(path) == snapshot / "model.safetensors"


def test_automodel_from_repo_id_offline_without_impure_hf(hub_folder, source, tmp_path):
    _, model = source
    cache = tmp_path / "hf" / "hub"
    add_to_hf_cache(hub_folder, "impure-hf/impure-vit-tiny", cache_dir=cache)
    x = real_photos()
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoImageProcessor, AutoModel
        model = AutoModel.from_pretrained("impure-hf/impure-vit-tiny", trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained("impure-hf/impure-vit-tiny", trust_remote_code=True)
        assert "impure_hf" not in sys.modules, "impure_hf was imported"
        assert not type(model).__module__.startswith("impure_hf"), type(model).__module__
        assert type(processor).__name__ == "ImpureImageProcessor" and processor.crop_size == {{"height": 32, "width": 32}}
        x = torch.load({str(tmp_path / "x.pt")!r})
        out = model(x, generator=torch.Generator().manual_seed(3)).purified_pixel_values
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(cache))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), _purified(model, x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- door 2: torch.hub
def test_torch_hub_local_entry_points(source, tmp_path):
    folder, model = source
    untrained = torch.hub.load(str(REPO_ROOT), "impure_vit_tiny", source="local", pretrained=False)
    assert isinstance(untrained, ImpureModel) and not untrained.training
    assert untrained.config.to_dict() == ImpureConfig.from_preset("impure-vit-tiny").to_dict()
    x = real_photos(size=64, n=1)  # any side that is a multiple of the patch works; small keeps it fast
    out = untrained(x, generator=torch.Generator().manual_seed(0)).purified_pixel_values
    again = untrained(x, generator=torch.Generator().manual_seed(0)).purified_pixel_values
    # a working purifier: a rebuilt image (not the input passed through), reproducible from the generator
    assert out.shape == x.shape and (out - x).abs().mean() > 1e-2
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    # weights from a folder (or Hub id) instead of the embedded ones
    loaded = torch.hub.load(str(REPO_ROOT), "impure_vit_tiny", source="local", repo_id=str(folder))
    torch.testing.assert_close(_purified(loaded, real_photos()), _purified(model, real_photos()), rtol=0, atol=1e-5)
    with torch.device("meta"):  # the ViT-B presets, shapes only
        for entry, preset in (("impure_vit_b", "impure-vit-b"), ("impure_vit_b_release", "impure-vit-b-release")):
            built = torch.hub.load(str(REPO_ROOT), entry, source="local", pretrained=False)
            assert built.config.to_dict() == ImpureConfig.from_preset(preset).to_dict()


def test_embedded_default_is_small_safetensors_and_every_default_loader_returns_it():
    weights = Path(impure_hf.DEFAULT_MODEL) / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 30 * 2**20
    embedded = ImpureModel.from_pretrained(impure_hf.DEFAULT_MODEL).state_dict()
    hub_model = torch.hub.load(str(REPO_ROOT), "impure_vit_tiny", source="local")  # no arguments
    for model in (hub_model, load_purifier()):  # load_purifier(None): impure demo / purify / app
        assert isinstance(model, ImpureModel) and not model.training
        loaded = model.state_dict()
        assert loaded.keys() == embedded.keys()
        for name, tensor in loaded.items():
            assert torch.equal(tensor, embedded[name]), name


def test_torch_hub_pretrained_comes_through_the_hf_cache(hub_folder, source, tmp_path):
    """impure_vit_b(pretrained=True) resolves its repo id in the HF cache with no network (plumbing
    test: a tiny model stands in for the ViT-B weights under that repo id)."""
    add_to_hf_cache(hub_folder, HUB_REPO_IDS["impure-vit-b"], cache_dir=tmp_path)
    loaded = torch.hub.load(str(REPO_ROOT), "impure_vit_b", source="local", cache_dir=str(tmp_path), local_files_only=True)
    torch.testing.assert_close(_purified(loaded, real_photos()), _purified(source[1], real_photos()), rtol=0, atol=1e-5)


@pytest.fixture
def torch_hub_cache(tmp_path, monkeypatch):
    """<hub_dir>/<owner>_<repo>_<branch>/ as torch.hub leaves GitHub's zip, plus trusted_list; no network."""
    owner, name = GITHUB_REPO.split("/")
    hub_dir = tmp_path / "torch_hub"
    repo_dir = hub_dir / f"{owner}_{name}_main"
    repo_dir.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "weights")
    for item in ("hubconf.py", "setup.cfg", "pyproject.toml", "impure_hf", "model_card"):
        src = REPO_ROOT / item
        shutil.copytree(src, repo_dir / item, ignore=ignore) if src.is_dir() else shutil.copy(src, repo_dir / item)
    (hub_dir / "trusted_list").write_text(f"{owner}_{name}\n")
    urls = []

    def offline(url, *args, **kwargs):
        urls.append(getattr(url, "full_url", url))
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(hub_dir))
    yield urls
    torch.hub.set_dir(previous)


def test_torch_hub_github_second_call_uses_the_cache(torch_hub_cache):
    urls = torch_hub_cache
    model = torch.hub.load(f"{GITHUB_REPO}:main", "impure_vit_tiny", trust_repo=True, pretrained=False)
    assert isinstance(model, ImpureModel) and urls == []  # branch given: no network at all
    assert sorted(torch.hub.list(f"{GITHUB_REPO}:main", trust_repo="check")) == sorted(ENTRY_POINTS)
    help_text = torch.hub.help(f"{GITHUB_REPO}:main", "impure_vit_b", trust_repo="check")
    assert "pretrained" in help_text and "repo_id" in help_text
    # no branch: torch.hub probes GitHub for the default branch, fails offline, and uses the cache
    model = torch.hub.load(GITHUB_REPO, "impure_vit_tiny", trust_repo=True, pretrained=False)
    assert isinstance(model, ImpureModel)
    assert urls == [f"https://github.com/{GITHUB_REPO}/tree/main/"]


def test_purified_classifier_entry_point(source):
    evaluate = pytest.importorskip("impure_hf.evaluate")
    folder, model = source
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    wrapped = torch.hub.load(str(REPO_ROOT), "purified_classifier", source="local", classifier=classifier,
                             purifier=str(folder), num_samples=2)
    assert isinstance(wrapped, evaluate.PurifiedClassifier) and not wrapped.training
    logits = wrapped(real_photos())
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
