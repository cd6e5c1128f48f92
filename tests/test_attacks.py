"""The nine attacks on real EfficientNet-Lite0 weights (at 64 px for speed): budgets, success, seeds, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torchattacks
from torch import nn

from fixtures_data import foolbox_batch, lite0_small
from impure_hf.attacks import (
    ATTACK_NORMS,
    ATTACKS,
    DEFAULT_EPS,
    TopKDeepFool,
    attack_images,
    attack_success,
    make_adaptive_attack,
    make_attack,
    round_to_uint8,
)
from impure_hf.baselines import Purifier
from impure_hf.classifiers import predict
from impure_hf.defended import PurifiedClassifier


@pytest.fixture(scope="module")
def batch():
    """Three foolbox photos at 64 px, labelled by the 64 px classifier's own clean predictions."""
    classifier = lite0_small()
    images, _ = foolbox_batch(64, n=3)
    return classifier, images, predict(classifier, images)


def test_the_paper_attacks_are_all_there():
    assert list(ATTACKS) == ["fgsm", "cw", "deepfool", "pgd", "mifgsm", "difgsm", "mdfgsm", "apgd-ce", "apgd-dlr"]
    assert {name for name, norm in ATTACK_NORMS.items() if norm == "L2"} == {"cw", "deepfool"}


# the minimal-perturbation attacks take a minute or more on 2 cores: slow
SLOW_ATTACKS = ("cw", "deepfool")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ATTACKS else n for n in ATTACKS]
)
def test_attack_fools_within_budget_after_rounding(batch, name):
    classifier, images, labels = batch
    state = {k: v.clone() for k, v in classifier.state_dict().items()}
    adversarial = attack_images(make_attack(name, classifier), images, labels, seed=0)
    assert adversarial.shape == images.shape and 0 <= adversarial.min() and adversarial.max() <= 1
    stored = round_to_uint8(adversarial)
    assert torch.equal(stored * 255, (stored * 255).round())
    if ATTACK_NORMS[name] == "Linf":
        assert (stored - images).abs().max() <= DEFAULT_EPS + 1e-6
    assert (stored != images).any()
    assert attack_success(classifier, stored, labels).all()
    # the attack leaves the target as it found it: eval mode, same weights and BatchNorm statistics
    assert not classifier.training
    assert all(torch.equal(v, state[k]) for k, v in classifier.state_dict().items())


def test_seeded_attacks_are_reproducible_and_leave_global_rng_alone(batch):
    classifier, images, labels = batch
    attack = make_attack("pgd", classifier, steps=2)
    torch.manual_seed(123)
    first = attack_images(attack, images, labels, seed=7)
    after_first = torch.rand(3)
    torch.manual_seed(123)
    second = attack_images(attack, images, labels, seed=7)
    assert torch.equal(first, second)
    assert torch.equal(torch.rand(3), after_first)  # the caller's random stream is untouched
    assert not torch.equal(attack_images(attack, images, labels, seed=8), first)


def test_settings_and_step_size():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    pgd = make_attack("PGD", model, eps=8 / 255)
    assert (pgd.eps, pgd.alpha, pgd.steps, pgd.random_start) == (8 / 255, 2 / 255, 10, True)
    assert make_attack("pgd", model).alpha == pytest.approx(4 / 255)  # the paper's step at 16/255
    mdfgsm = make_attack("mdfgsm", model, alpha=1 / 255)
    assert (mdfgsm.decay, mdfgsm.resize_rate, mdfgsm.diversity_prob, mdfgsm.alpha) == (1.0, 0.9, 0.5, 1 / 255)
    cw = make_attack("cw", model, c=0.5)
    assert (cw.c, cw.kappa, cw.steps) == (0.5, 40.0, 50)
    assert make_attack("apgd-dlr", model).loss == "dlr"


def test_clear_errors(batch):
    classifier, images, labels = batch
    with pytest.raises(ValueError, match="unknown attack 'bim'"):
        make_attack("bim", classifier)
    for eps in (16, 0, -0.1, math.nan):
        with pytest.raises(ValueError, match="eps"):
            make_attack("pgd", classifier, eps=eps)
    with pytest.raises(ValueError, match="16/255"):
        make_attack("fgsm", classifier, eps=16)
    with pytest.raises(ValueError, match="no setting"):
        make_attack("fgsm", classifier, steps=3)
    with pytest.raises(TypeError, match="nn.Module"):
        make_attack("fgsm", lambda x: x)
    attack = make_attack("fgsm", classifier)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack_images(attack, images * 2, labels)
    with pytest.raises(ValueError, match="labels"):
        attack_images(attack, images, labels[:1])


def test_round_to_uint8_keeps_budget_for_any_eps():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (2, 3, 8, 8), generator=generator) / 255
    adversarial = (clean + 0.2 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    eps = 10.5 / 255  # not a whole number of 8-bit steps: plain rounding could exceed it
    stored = round_to_uint8(adversarial, clean, eps)
    assert (stored - clean).abs().max() <= eps
    assert (stored - clean).abs().max() * 255 == pytest.approx(10)
    assert torch.equal(stored * 255, (stored * 255).round())


def test_top_k_deepfool_with_all_classes_is_torchattacks_deepfool():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    images = torch.rand(3, 3, 8, 8)
    labels = model(images).argmax(1)
    ours = TopKDeepFool(model, num_classes=5, rounding_safe=False)(images, labels)
    reference = torchattacks.DeepFool(model)(images, labels)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert not torch.equal(ours, images)


def test_deepfool_survives_rounding(batch):
    classifier, images, labels = batch
    plain = attack_images(make_attack("deepfool", classifier, rounding_safe=False), images, labels)
    # DeepFool stops just across the boundary (where it gets there in its steps): 8-bit rounding undoes it ...
    crossed = attack_success(classifier, plain, labels)
    assert crossed.sum() >= 2
    assert not attack_success(classifier, round_to_uint8(plain[crossed]), labels[crossed]).any()
    # ... unless its perturbation is scaled up until the rounded image still fools the model
    safe = attack_images(make_attack("deepfool", classifier), images, labels)
    assert torch.equal(round_to_uint8(safe), safe)
    assert attack_success(classifier, safe, labels).all()
    assert (safe - images).flatten(1).norm(dim=1).max() < 1.0  # still a small L2 perturbation


class _NoisyIdentity(Purifier):
    """A stochastic defence too faint to change the 64 px classifier's clean predictions (resize-pad,
    and even noise of 1/255, change them at 64 px, and APGD leaves an image it cannot start from untouched)."""

    name, stochastic = "noisy-identity", True

    def transform(self, pixel_values, generator):
        noise = torch.randn(pixel_values.shape, generator=generator, device=pixel_values.device)
        return (pixel_values + 1e-4 * noise).clamp(0, 1)


def test_autoattack_rand_runs_through_a_random_defence_with_eot(batch):
    """The randomised AutoAttack the README's white-box numbers use: APGD-CE then APGD-DLR, each
    with EOT over a stochastic defence, seeded so that a rerun crafts the same images."""
    classifier, images, labels = batch

    def craft() -> torch.Tensor:
        # fresh defence randomness per run, as the harness seeds it per batch
        defended = PurifiedClassifier(_NoisyIdentity(), classifier, generator=torch.Generator().manual_seed(0))
        attack = make_adaptive_attack("autoattack-rand", defended, eps=DEFAULT_EPS, eot_samples=2, steps=3)
        assert [(p.loss, p.eot_iter, p.steps) for p in attack.attacks] == [("ce", 2, 3), ("dlr", 2, 3)]
        return attack_images(attack, images, labels, seed=0)

    adversarial = craft()
    torch.testing.assert_close(craft(), adversarial, rtol=0, atol=0)
    assert (adversarial - images).abs().max() <= DEFAULT_EPS + 1e-6
    # crafted through the random defence, every image is changed and fools the bare classifier
    assert (adversarial != images).flatten(1).any(dim=1).all()
    assert attack_success(classifier, adversarial, labels).all()
