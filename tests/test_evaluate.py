"""Evaluation harness: PurifiedClassifier, honesty (identity == no defence), labels, resume,
adaptive attacks break random resize-pad, and data-parallel == single process.

Real data throughout: foolbox's labelled ImageNet photos, EfficientNet-Lite0 with its real weights.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from impure_hf import ImpureModel
from impure_hf.baselines import IdentityPurifier, RandomResizePad
from impure_hf.classifiers import load_classifier
from impure_hf.evaluate import PurifiedClassifier, evaluate, load_eval_images, render_markdown


@pytest.fixture(scope="module")
def classifier():
    return load_classifier("efficientnet_lite0")


@pytest.fixture(scope="module")
def photos():
    return load_eval_images(max_images=4)


def small_purifier() -> ImpureModel:
    """An untrained IMPure purifier at 224 px, cut to two encoder and one decoder block for speed."""
    torch.manual_seed(0)
    return ImpureModel.from_preset(
        "impure-vit-tiny", num_hidden_layers=2, decoder_num_hidden_layers=1, fusion_layers=(0,)
    ).eval()


SMALL_RUN = dict(
    attacks=["fgsm", "pgd"],
    adaptive_attacks=["pgd-eot"],
    steps=2,
    eot_samples=2,
    repeats=2,
    batch_size=2,
    progress=False,
)


def _cells(results) -> dict:
    return {(c["classifier"], c["threat_model"], c["attack"], c["defence"]): c for c in results["cells"]}


# ---------------------------------------------------------------------------------- PurifiedClassifier
def test_purified_classifier_averages_stochastic_purifications(classifier, photos):
    purifier = small_purifier()
    x = photos.pixel_values[:1]
    defended = PurifiedClassifier(purifier, classifier, num_samples=3)
    averaged = defended(x, generator=torch.Generator().manual_seed(5))
    single = PurifiedClassifier(purifier, classifier)
    gen = torch.Generator().manual_seed(5)
    draws = [single(x, generator=gen) for _ in range(3)]
    torch.testing.assert_close(averaged, sum(draws) / 3)
    assert (draws[0] - draws[1]).abs().max() > 1e-4  # the purifier is random, so averaging matters
    # end-to-end gradients reach the input through the purifier (white-box attacks need them)
    x = x.clone().requires_grad_(True)
    defended(x, generator=torch.Generator().manual_seed(0)).logsumexp(-1).sum().backward()
    assert x.grad.abs().sum() > 0


def test_purified_classifier_with_a_deterministic_purifier_runs_it_once(classifier, photos):
    calls = []
    identity = IdentityPurifier()
    identity.register_forward_hook(lambda *args: calls.append(1))
    x = photos.pixel_values[:2]
    defended = PurifiedClassifier(identity, classifier, num_samples=4)
    assert not defended.training  # so that torchattacks does not switch the classifier to training mode
    logits = defended(x)
    assert len(calls) == 1
    torch.testing.assert_close(logits, classifier(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_samples"):
        PurifiedClassifier(identity, classifier, num_samples=0)


# ---------------------------------------------------------------------------------- one small run
@pytest.fixture(scope="module")
def small_run(tmp_path_factory, classifier, photos):
    out = tmp_path_factory.mktemp("eval")
    results = evaluate(
        purifier=small_purifier(),
        classifiers=[classifier],
        baselines=["identity", "resize-pad"],
        data=photos,
        out_dir=out,
        panels=2,
        **SMALL_RUN,
    )
    return results, out


def test_identity_defence_scores_exactly_the_no_defence_numbers(small_run):
    results, _ = small_run
    cells = _cells(results)
    compared = 0
    for (classifier, threat_model, attack, defence), cell in cells.items():
        if defence == "identity":
            bare = cells[(classifier, threat_model, attack, "none")]
            assert cell["correct"] == bare["correct"], (threat_model, attack)
            compared += 1
    assert compared == 4  # clean, black-box fgsm and pgd, white-box pgd-eot
    # and the attacks did work on the bare classifier, so the equality is not vacuous
    assert cells[("efficientnet_lite0", "black-box", "pgd", "none")]["accuracy_mean"] < 50


def test_every_number_carries_its_labels(small_run):
    results, out = small_run
    for cell in results["cells"]:
        assert cell["num_images"] == 3  # EfficientNet-Lite0 gets 3 of the first 4 photos right
        if cell["attack"] != "clean":
            assert cell["threat_model"] in ("black-box", "white-box")
            assert cell["norm"] == "Linf" and cell["eps"] == pytest.approx(16 / 255) and cell["rounded"] is True
            assert cell["steps"] == (1 if cell["attack"] == "fgsm" else 2)
        random_defence = cell["defence"] in ("resize-pad(scale=1.107)", "IMPure(custom)")
        assert cell["stochastic"] == random_defence and cell["repeats"] == (2 if random_defence else 1)
        if cell["threat_model"] == "white-box":
            assert cell["eot_samples"] == (2 if random_defence else 1)
    markdown = (out / "results.md").read_text()
    assert markdown == render_markdown(results) + "\n"
    for text in (
        "black-box: attack crafted on the classifier alone",
        "white-box adaptive",
        "pgd (Linf 16/255, 2 steps) |",
        "fgsm (Linf 16/255, 1 step) |",
        "pgd-eot (Linf 16/255, 2 steps, EOT 2 on random defences)",
        "n = 3 images (of 4)",
        "rounded to 8 bits",
        "Seed 0",
        "attack success on the bare classifier, after (before) rounding",
        "| IMPure(custom) |",
    ):
        assert text in markdown, text
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(results["cells"]) == 4 * 4  # defences x (clean, fgsm, pgd, pgd-eot)
    for row in rows:
        assert row["threat_model"] and row["num_images"] == "3" and row["seed"] == "0"
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["seed"] == 0 and saved["config"]["round_adversarial"] is True
    assert (out / "accuracy.png").stat().st_size > 10_000
    assert sorted(p.name for p in (out / "panels").iterdir()) == [
        "efficientnet_lite0_fgsm.png",
        "efficientnet_lite0_pgd.png",
    ]


def test_rerun_skips_finished_cells(small_run, classifier, photos, monkeypatch):
    results, out = small_run
    import impure_hf.evaluation.harness as harness

    calls = []
    original = harness.attack_images

    def counting(attack, images, labels, seed=None):
        calls.append(type(attack).__name__)
        return original(attack, images, labels, seed=seed)

    monkeypatch.setattr(harness, "attack_images", counting)
    # a lost cell is recomputed from the cached (8-bit) adversarial images, to the same numbers
    (lost,) = (out / "cells").glob("efficientnet_lite0__black-box__pgd__none__*.json")
    lost.unlink()
    again = evaluate(
        purifier=small_purifier(),
        classifiers=[classifier],
        baselines=["identity", "resize-pad", "bitdepth"],
        data=photos,
        out_dir=out,
        panels=0,
        **SMALL_RUN,
    )
    # only the new defence's white-box attack runs (2 batches); black-box images come from the cache
    assert calls == ["EOTPGD", "EOTPGD"]
    before, after = _cells(results), _cells(again)
    for key, cell in before.items():
        if key[1:] == ("black-box", "pgd", "none"):
            cell, after[key] = dict(cell, seconds=0), dict(after[key], seconds=0)
        assert after[key] == cell
    assert {key[3] for key in set(after) - set(before)} == {"bitdepth(bits=4)"}


def test_bad_settings_fail_clearly(classifier, photos):
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate(classifiers=[classifier], data=photos, attacks=["pgdd"], baselines=[], progress=False)
    with pytest.raises(ValueError, match="unknown threat model"):
        evaluate(classifiers=[classifier], data=photos, threat_models=["grey-box"], baselines=[], progress=False)
    with pytest.raises(ValueError, match="eps"):
        evaluate(classifiers=[classifier], data=photos, eps=16, baselines=[], progress=False)
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate(classifiers=[classifier], data=photos, baselines=["blur"], progress=False)
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        evaluate(classifiers=[classifier], data=photos, baselines=["none", "tv"], progress=False)


def test_baselines_none_flag_means_no_baseline():
    from impure_hf.evaluation.settings import EvalSettings

    assert EvalSettings(baselines=["none"]).checked().baselines == []
    assert EvalSettings(baselines=["tv"]).checked().baselines == ["tv"]


def test_image_folders_give_labels_from_file_names_or_none(tmp_path):
    import shutil

    from impure_hf.data import foolbox_imagenet_samples

    (path0, label0), (path1, label1) = foolbox_imagenet_samples()[:2]
    labelled, unlabelled = tmp_path / "labelled", tmp_path / "unlabelled"
    labelled.mkdir(), unlabelled.mkdir()
    shutil.copy(path0, labelled / path0.name), shutil.copy(path1, labelled / path1.name)
    shutil.copy(path0, unlabelled / "dog.jpg")
    images = load_eval_images(str(labelled), image_size=96)
    assert images.pixel_values.shape == (2, 3, 96, 96) and images.labels.tolist() == [label0, label1]
    assert load_eval_images(str(unlabelled), image_size=96).labels is None  # the classifier's predictions will serve


def test_random_resize_pad_falls_to_white_box_eot(classifier):
    # a small budget, where resizing does undo much of a transferred (black-box) perturbation
    results = evaluate(
        classifiers=[classifier],
        baselines=[RandomResizePad()],
        data=load_eval_images(max_images=8),
        eps=1 / 255,
        attacks=["pgd"],
        adaptive_attacks=["pgd-eot"],
        steps=3,
        eot_samples=2,
        repeats=3,
        progress=False,
    )
    cells = _cells(results)
    black = cells[("efficientnet_lite0", "black-box", "pgd", "resize-pad(scale=1.107)")]["accuracy_mean"]
    white = cells[("efficientnet_lite0", "white-box", "pgd-eot", "resize-pad(scale=1.107)")]["accuracy_mean"]
    assert cells[("efficientnet_lite0", "black-box", "pgd", "none")]["accuracy_mean"] == 0
    assert black >= 40
    assert white <= 0.5 * black


# ---------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_two_processes_give_the_single_process_table(tmp_path):
    arguments = [
        "evaluate",
        "--purifier",
        "impure-vit-tiny",
        "--baselines",
        "identity",
        "resize-pad",
        "--attacks",
        "fgsm",
        "pgd",
        "--adaptive-attacks",
        "pgd-eot",
        "--max-images",
        "4",
        "--steps",
        "2",
        "--eot-samples",
        "2",
        "--repeats",
        "2",
        "--batch-size",
        "1",
        "--panels",
        "0",
    ]
    # DDP on CPUs (gloo): accelerate's multi-GPU launcher with ACCELERATE_USE_CPU (`--cpu` runs one process)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "impure_hf.cli",
    ]
    subprocess.run(launch + arguments + ["--out", str(tmp_path / "two")], check=True, env=env, timeout=600)
    subprocess.run(
        [sys.executable, "-m", "impure_hf.cli"] + arguments + ["--out", str(tmp_path / "one")],
        check=True,
        env=env,
        timeout=600,
    )
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["config"]["num_processes"] == 2 and one["config"]["num_processes"] == 1

    def table(results):
        return {key: (c["correct"], c["accuracies"], c["column"]) for key, c in _cells(results).items()}

    assert table(one) == table(two)
