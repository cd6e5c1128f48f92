"""The paper's nine attacks (DESIGN.md sections 3-4), built on torchattacks.

All are untargeted and work on [0, 1] images through a classifier that takes [0, 1] inputs
(an [`ImageClassifier`](classifiers.py)). Settings follow the paper and the authors' release:

| name | torchattacks class | norm | settings |
|---|---|---|---|
| fgsm | FGSM | Linf | one step of size eps |
| pgd | PGD | Linf | 10 steps of eps/4, uniform random start |
| mifgsm | MIFGSM | Linf | 10 steps of eps/4, momentum 1.0 |
| difgsm | DIFGSM | Linf | 10 steps of eps/4, input diversity: resize 0.9, probability 0.5 |
| mdfgsm | DIFGSM | Linf | DI-FGSM with momentum 1.0 |
| apgd-ce | APGD | Linf | 10 steps, cross-entropy loss, 1 restart |
| apgd-dlr | APGD | Linf | 10 steps, DLR loss, 1 restart |
| cw | CW | L2 | c 1, confidence (kappa) 40, 50 Adam steps of lr 0.01 |
| deepfool | TopKDeepFool | L2 | 50 steps, 10 candidate classes, overshoot 0.02, rounding-safe |

eps/4 is the paper's 4/255 step at the default eps of 16/255. The L2 attacks look for a minimal
perturbation and are not bounded by ``eps``. The paper runs CW with 5 binary-search steps over
``c``; torchattacks' CW has no binary search, so one fixed ``c`` is used (pass ``c=...`` to
change it). DeepFool's barely-across-the-boundary perturbation is scaled up until it survives
rounding to 8-bit pixels (see [`TopKDeepFool`]).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Optional

import torch
from torch import nn

try:
    import torchattacks
except ImportError:  # not in install_requires: it pins requests~=2.25.1, which pip cannot resolve with the HF stack
    raise ImportError("impure_hf needs torchattacks, installed without its dependencies by install.sh: "
                      "pip install --no-deps torchattacks==3.5.1") from None

from .classifiers import predict

DEFAULT_EPS = 16 / 255
STEP_FRACTION = 1 / 4  # step size of the iterative L_inf attacks, as a fraction of eps


class TopKDeepFool(torchattacks.DeepFool):
    """DeepFool-L2 that linearises only the ``num_classes`` most likely classes at each step, and
    whose result survives rounding to 8-bit pixels.

    torchattacks' DeepFool takes the gradient of every logit (1000 backward passes per step on
    ImageNet). The DeepFool authors' own code limits the search to the top classes (10 by
    default there too), where the nearest boundary almost always lies: k - 1 backward passes per
    step. With ``num_classes`` equal to the number of classes it computes exactly torchattacks'
    DeepFool.

    DeepFool stops just across the decision boundary, with a perturbation far below one 8-bit
    step per pixel: saved as an image it is rounded away. With ``rounding_safe`` the total
    perturbation r is then scaled by the smallest factor ``rounding_growth ** i``
    (i = 0 .. ``rounding_search_steps``) for which ``round_to_uint8(x + factor * r)`` still fools
    the model, and that rounded image is returned (a per-image overshoot, as in DeepFool's
    ``x + (1 + overshoot) * r``, sized for the 8-bit grid). Images it cannot fool are returned as
    DeepFool left them, rounded.
    """

    def __init__(
        self,
        model: nn.Module,
        steps: int = 50,
        overshoot: float = 0.02,
        num_classes: int = 10,
        rounding_safe: bool = True,
        rounding_growth: float = 1.5,
        rounding_search_steps: int = 16,
    ):
        super().__init__(model, steps=steps, overshoot=overshoot)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (the label and one other), got {num_classes}")
        if rounding_growth <= 1:
            raise ValueError(f"rounding_growth must be > 1, got {rounding_growth}")
        self.num_classes = num_classes
        self.rounding_safe = rounding_safe
        self.rounding_growth = rounding_growth
        self.rounding_search_steps = rounding_search_steps

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        adv_images, _ = self.forward_return_target_labels(images, labels)
        if not self.rounding_safe:
            return adv_images
        images, labels = images.to(self.device), labels.to(self.device)
        perturbation = adv_images - images
        result = round_to_uint8(adv_images)
        pending = torch.ones(len(images), dtype=torch.bool, device=self.device)
        factor = 1.0
        for _ in range(self.rounding_search_steps + 1):
            candidates = round_to_uint8(images[pending] + factor * perturbation[pending])
            with torch.no_grad():
                fooled = self.get_logits(candidates).argmax(dim=1) != labels[pending]
            result[pending.nonzero()[fooled, 0]] = candidates[fooled]
            pending[pending.clone()] = ~fooled
            if not pending.any():
                break
            factor *= self.rounding_growth
        return result

    def _forward_indiv(self, image: torch.Tensor, label: torch.Tensor):
        image.requires_grad = True
        logits = self.get_logits(image)[0]
        prediction = logits.argmax()
        if prediction != label:
            return True, prediction, image
        others = logits.detach().clone()
        others[label] = -math.inf
        candidates = others.topk(min(self.num_classes, len(logits)) - 1).indices
        # f'_k = f_k - f_label and its gradient w'_k, for each candidate class k
        margins = logits[candidates] - logits[label]
        w_prime = torch.stack(
            [torch.autograd.grad(m, image, retain_graph=k + 1 < len(margins))[0].flatten() for k, m in enumerate(margins)]
        )
        f_prime = margins.detach()
        distance = f_prime.abs() / w_prime.norm(dim=1)
        nearest = distance.argmin()
        delta = f_prime[nearest].abs() * w_prime[nearest] / w_prime[nearest].norm() ** 2
        adv_image = torch.clamp(image.detach() + (1 + self.overshoot) * delta.view_as(image), 0, 1)
        return False, candidates[nearest], adv_image


# name -> (norm, torchattacks class, default settings)
_ATTACK_TABLE: dict[str, tuple[str, type, dict]] = {
    "fgsm": ("Linf", torchattacks.FGSM, {}),
    "cw": ("L2", torchattacks.CW, dict(c=1.0, kappa=40.0, steps=50, lr=0.01)),
    "deepfool": ("L2", TopKDeepFool, dict(steps=50, overshoot=0.02, num_classes=10)),
    "pgd": ("Linf", torchattacks.PGD, dict(steps=10, random_start=True)),
    "mifgsm": ("Linf", torchattacks.MIFGSM, dict(steps=10, decay=1.0)),
    "difgsm": ("Linf", torchattacks.DIFGSM, dict(steps=10, decay=0.0, resize_rate=0.9, diversity_prob=0.5)),
    "mdfgsm": ("Linf", torchattacks.DIFGSM, dict(steps=10, decay=1.0, resize_rate=0.9, diversity_prob=0.5)),
    "apgd-ce": ("Linf", torchattacks.APGD, dict(norm="Linf", steps=10, n_restarts=1, loss="ce")),
    "apgd-dlr": ("Linf", torchattacks.APGD, dict(norm="Linf", steps=10, n_restarts=1, loss="dlr")),
}

ATTACK_NORMS: dict[str, str] = {name: norm for name, (norm, _, _) in _ATTACK_TABLE.items()}


def _factory(name: str) -> Callable[..., torchattacks.Attack]:
    norm, cls, defaults = _ATTACK_TABLE[name]
    accepted = set(inspect.signature(cls).parameters) - {"model"}

    def factory(model: nn.Module, eps: float = DEFAULT_EPS, **params) -> torchattacks.Attack:
        unknown = set(params) - accepted
        if unknown:
            raise ValueError(f"attack {name!r} ({cls.__name__}) has no setting(s) {sorted(unknown)}; it takes {sorted(accepted)}")
        settings = {**defaults, **params}
        if norm == "Linf":  # the L2 attacks are minimal-perturbation attacks: eps does not bound them
            settings["eps"] = eps
            if "alpha" in accepted:
                settings.setdefault("alpha", eps * STEP_FRACTION)
        return cls(model, **settings)

    factory.__name__ = f"make_{name.replace('-', '_')}"
    factory.__doc__ = f"{cls.__name__} ({norm}) with the paper's settings {defaults}; keyword arguments override them."
    return factory


ATTACKS: dict[str, Callable[..., torchattacks.Attack]] = {name: _factory(name) for name in _ATTACK_TABLE}


def check_eps(eps: float) -> float:
    """``eps`` as a float in (0, 1] (pixel units of [0, 1] images), or a ValueError saying why not."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number, got {eps!r}")
    if eps > 1:
        raise ValueError(f"eps={eps} is out of range (0, 1]: images are in [0, 1]; did you mean {eps:g}/255 = {eps / 255:.4f}?")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return float(eps)


def make_attack(name: str, model: nn.Module, eps: float = DEFAULT_EPS, **params) -> torchattacks.Attack:
    """One of [`ATTACKS`] against ``model`` (which takes [0, 1] images), with the paper's settings.

    Args:
        name: attack name (see the module docstring), case-insensitive.
        model: the target, e.g. an [`ImageClassifier`]; it should be in eval mode.
        eps: L_inf budget in [0, 1] pixel units (default 16/255); unused by the L2 attacks.
        params: torchattacks settings that override the defaults (``steps=20``, ``c=0.5``, ...).
    """
    key = name.lower()
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module taking [0, 1] images, got {type(model).__name__}")
    return ATTACKS[key](model, eps=check_eps(eps), **params)


def attack_images(
    attack: torchattacks.Attack,
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """Adversarial versions (N, 3, H, W) in [0, 1] of ``images`` for their true ``labels`` (N,).

    torchattacks draws its random starts and input-diversity transforms from torch's global
    generator; with ``seed`` they are drawn from a fork of it seeded with ``seed``, so the result
    is reproducible and the caller's random state is left untouched. Attacks with a ``seed``
    setting of their own (APGD) get ``seed`` too.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError("images must be in [0, 1]")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"expected {len(images)} labels, got shape {tuple(labels.shape)}")
    if seed is None:
        return attack(images, labels).detach().clamp(0, 1)
    if hasattr(attack, "seed"):
        attack.seed = seed
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return attack(images, labels).detach().clamp(0, 1)


def round_to_uint8(
    images: torch.Tensor, clean: Optional[torch.Tensor] = None, eps: Optional[float] = None
) -> torch.Tensor:
    """Round [0, 1] images to the 8-bit grid (what saving as PNG keeps), as floats in [0, 1].

    With ``clean`` (on the 8-bit grid) and ``eps``, the rounded images are also clipped to the
    L_inf ball of whole 8-bit steps around ``clean``, so rounding never leaves the budget even
    when ``eps * 255`` is not an integer.
    """
    levels = (images.clamp(0, 1) * 255).round()
    if clean is not None and eps is not None:
        reference = (clean * 255).round()
        budget = math.floor(eps * 255 + 1e-6)  # tolerance: 16/255*255 is 15.999999999999998
        levels = torch.minimum(torch.maximum(levels, reference - budget), reference + budget)
    return levels / 255


def attack_success(model: nn.Module, adversarial: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Boolean (N,): True where ``model`` does not predict ``labels`` on the adversarial images."""
    return predict(model, adversarial, batch_size=batch_size) != labels.cpu()


# ---------------------------------------------------------------------------------- adaptive (white-box) attacks
# white-box attacks beyond the nine: PGD and the randomised AutoAttack with EOT gradient averaging
ADAPTIVE_ATTACKS = ("pgd-eot", "autoattack-rand")


def paper_attack(name: str, model: nn.Module, eps: float, steps: Optional[int], **params):
    """One of the nine attacks with the paper's settings, its number of steps overridden when given."""
    attack = make_attack(name, model, eps=eps, **params)
    if steps is not None and hasattr(attack, "steps"):  # one-step attacks (FGSM) keep theirs
        attack = make_attack(name, model, eps=eps, steps=steps, **params)
    return attack


def make_adaptive_attack(name: str, model: nn.Module, eps: float, eot_samples: int = 1, steps: Optional[int] = None):
    """A white-box attack on ``model`` (a defended classifier).

    ``pgd-eot``: torchattacks' EOTPGD with the paper's PGD settings, gradients averaged over
    ``eot_samples`` forward passes. ``autoattack-rand``: AutoAttack's version for randomised
    defences, APGD-CE then APGD-DLR (each image keeps the first that succeeds) with EOT; the
    number of EOT samples is configurable here (AutoAttack fixes 20). Any of the nine attack names:
    that attack on ``model`` as given (wrap it with ``PurifiedClassifier(num_samples=E)`` for EOT on
    averaged logits).
    """
    if name == "pgd-eot":
        pgd = paper_attack("pgd", model, eps, steps)
        return torchattacks.EOTPGD(
            model, eps=pgd.eps, alpha=pgd.alpha, steps=pgd.steps, eot_iter=eot_samples, random_start=pgd.random_start
        )
    if name == "autoattack-rand":
        parts = [paper_attack(part, model, eps, steps, eot_iter=eot_samples) for part in ("apgd-ce", "apgd-dlr")]
        return torchattacks.MultiAttack(parts)
    return paper_attack(name, model, eps, steps)


__all__ = [
    "ADAPTIVE_ATTACKS",
    "ATTACK_NORMS",
    "ATTACKS",
    "DEFAULT_EPS",
    "attack_images",
    "attack_success",
    "check_eps",
    "make_adaptive_attack",
    "make_attack",
    "paper_attack",
    "round_to_uint8",
    "TopKDeepFool",
]
