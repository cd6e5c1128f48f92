"""Training losses of IMPure: L1 pixel loss, perceptual loss on named layers, random combination (RCM).

The paper's objective, for a purified image x_hat of an adversarial image x_adv with clean image x:

    L = |x_hat - x|_1 + sum_i lambda_i |F_i(x') - F_i(x)|_1,    x' = x_hat * u + x_adv * (1 - u)

where F_i are layers of a frozen network (VGG19 in the paper) and u is a random patch-level mask
(RCM) that pastes patches of the adversarial input into the purified image, so that the purifier
learns to survive perturbation it failed to remove. [`PurificationLoss`] puts the three pieces
together exactly as the authors' release computes them (reference README, section 10), without
the release's in-place un-normalisation, so backward works in fp32 as well as under autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .configuration_impure import IMAGENET_MEAN, IMAGENET_STD

# Paper: VGG19 block-4 ReLU (relu4_4), block-5 ReLU (relu5_4) and the pre-softmax logits.
VGG19_PAPER_LAYERS = {"features.26": 30.0, "features.35": 10.0, "classifier.6": 5.0}
# Release: VGG19-BN relu4_4, relu5_4 and the ReLU after the first fully connected layer.
VGG19_BN_RELEASE_LAYERS = {"features.38": 30.0, "features.51": 10.0, "classifier.1": 10.0}


def pixel_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error; the paper applies it in the model's normalised space."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    return F.l1_loss(prediction, target)


# ---------------------------------------------------------------------------------- perceptual
class PerceptualLoss(nn.Module):
    """Weighted L1 distances between features of a frozen network at named layers.

    ``loss(input, target)`` returns ``{layer: weight * mean |F_layer(input) - F_layer(target)|, ...,
    "total": sum}``; target features are computed without gradients. Layers are module names of
    ``extractor`` (``dict(extractor.named_modules())``); their outputs are read with forward hooks
    that live only for the duration of the call, so any ``nn.Module`` works (torchvision, timm,
    transformers, a classifier wrapper) and a classifier shared with other code is left untouched.

    Args:
        extractor: the feature network. It is frozen and kept in eval mode.
        layers: module names whose outputs are compared.
        weights: one weight per layer.
        mean / std: per-channel normalisation applied to the [0, 1] inputs before ``extractor``
            (None: the extractor takes [0, 1] images, e.g. a classifier that normalises itself).
    """

    def __init__(
        self,
        extractor: nn.Module,
        layers: Sequence[str],
        weights: Sequence[float],
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        layers, weights = list(layers), [float(w) for w in weights]
        if not layers:
            raise ValueError("a perceptual loss needs at least one layer")
        if len(layers) != len(weights):
            raise ValueError(f"got {len(layers)} layers but {len(weights)} weights: {layers} / {weights}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"perceptual layers must be distinct, got {layers}")
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"perceptual loss weights must be finite and non-negative, got {weights}")
        modules = dict(extractor.named_modules())
        unknown = [name for name in layers if name not in modules]
        if unknown:
            hint = ", ".join(name for name in list(modules)[1:12])
            raise ValueError(
                f"unknown perceptual loss layer(s) {unknown} for {type(extractor).__name__}; layers are "
                f"module names such as {hint}, ... (see dict(model.named_modules()))"
            )
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.extractor = extractor.eval().requires_grad_(False)
        self.layers, self.weights = layers, weights
        if mean is not None:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        else:
            self.mean = self.std = None

    # ------------------------------------------------------------------ presets
    @classmethod
    def vgg19(cls, weights: Optional[str] = "DEFAULT", layers: Optional[Mapping[str, float]] = None) -> "PerceptualLoss":
        """The paper's loss: torchvision VGG19, relu4_4 (30), relu5_4 (10), logits (5).

        Args:
            weights: torchvision weights name (``"DEFAULT"``: ImageNet) or None (random init,
                e.g. offline tests).
            layers: ``{layer: weight}`` replacing the paper's layers.
        """
        extractor = _torchvision_model(torchvision.models.vgg19, weights)
        layers = layers or VGG19_PAPER_LAYERS
        return cls(extractor, list(layers), list(layers.values()), IMAGENET_MEAN, IMAGENET_STD)

    @classmethod
    def vgg19_bn_release(cls, weights: Optional[str] = "DEFAULT", layers: Optional[Mapping[str, float]] = None) -> "PerceptualLoss":
        """The authors' release: torchvision VGG19-BN, features.38 (30), features.51 (10),
        classifier.1 (10). Arguments as [`~PerceptualLoss.vgg19`]."""
        extractor = _torchvision_model(torchvision.models.vgg19_bn, weights)
        layers = layers or VGG19_BN_RELEASE_LAYERS
        return cls(extractor, list(layers), list(layers.values()), IMAGENET_MEAN, IMAGENET_STD)

    @classmethod
    def from_classifier(
        cls,
        classifier: nn.Module,
        layers: Optional[Sequence[str]] = None,
        weights: Optional[Sequence[float]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> "PerceptualLoss":
        """The target classifier's own layers (the paper's "more flexible perceptual loss").

        ``classifier`` takes [0, 1] images (as ``impure_hf.classifiers.ImageClassifier``, which
        resizes and normalises itself); pass ``mean``/``std`` for one that expects normalised input.
        Default layers, for a classifier that contains a timm model: its last two feature stages
        and its classification head, weighted (30, 10, 5) like the paper's VGG layers. Explicit
        ``layers`` without ``weights`` are weighted 1 each.
        """
        if layers is None:
            layers = _default_classifier_layers(classifier)
            weights = (30.0, 10.0, 5.0) if weights is None else weights
        elif weights is None:
            weights = [1.0] * len(layers)
        return cls(classifier, layers, weights, mean, std)

    # ------------------------------------------------------------------ forward
    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.extractor.eval()  # frozen: BatchNorm statistics and dropout stay in inference mode
        return self

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs of the loss layers for [0, 1] images."""
        if self.mean is not None:
            images = (images - self.mean) / self.std
        found: dict[str, torch.Tensor] = {}

        def keep(name, module, args, output):
            found[name] = output[0] if isinstance(output, (tuple, list)) else output

        modules = dict(self.extractor.named_modules())
        handles = [modules[name].register_forward_hook(partial(keep, name)) for name in self.layers]
        try:
            self.extractor(images)
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in self.layers if name not in found]
        if missing:
            raise RuntimeError(f"perceptual loss layer(s) {missing} were not called in the forward pass of the extractor")
        return found

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if input.shape != target.shape:
            raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} differ in shape")
        with torch.no_grad():
            target_features = self.features(target)
        input_features = self.features(input)
        terms = {
            name: weight * F.l1_loss(input_features[name].float(), target_features[name].float())
            for name, weight in zip(self.layers, self.weights)
        }
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms


def _torchvision_model(builder, weights: Optional[str]) -> nn.Module:
    try:
        return builder(weights=weights)
    except OSError as err:  # download failed (offline)
        raise RuntimeError(
            f"could not load the torchvision weights {weights!r} for {builder.__name__} ({err}). Put the file in the "
            "torch hub cache (torch.hub.get_dir()), or pass weights=None for a randomly initialised network"
        ) from err


def _default_classifier_layers(classifier: nn.Module) -> list[str]:
    """The last two feature stages and the head of the first timm model inside ``classifier``."""
    for prefix, module in classifier.named_modules():
        info = getattr(module, "feature_info", None)
        if info is not None and hasattr(module, "get_classifier"):
            stages = [entry["module"] for entry in info][-2:]
            head = next(name for name, m in module.named_modules() if m is module.get_classifier())
            dot = f"{prefix}." if prefix else ""
            return [dot + name for name in (*stages, head)]
    raise ValueError(
        f"cannot choose perceptual layers for {type(classifier).__name__} automatically (no timm model inside); "
        "pass layers=[...] with module names from dict(classifier.named_modules())"
    )


# ---------------------------------------------------------------------------------- RCM
@dataclass
class RandomCombinationDraws:
    """The random draws of one RCM mask, to replay it.

    Args:
        noise: (N, L) uniform noise; patches sorted by it form the shuffled order.
        num_chunks: k, the number of chunks the shuffled order is cut into (one value per batch).
        chunk_index: j, the chunk whose patches are taken from the adversarial image.
    """

    noise: torch.Tensor
    num_chunks: int
    chunk_index: int


@dataclass
class RandomCombinationOutput:
    """``mixed`` = purified * mask + adversarial * (1 - mask); ``mask`` (N, C, H, W), 1 = purified."""

    mixed: torch.Tensor
    mask: torch.Tensor


class RandomCombination(nn.Module):
    """RCM: paste a random chunk of adversarial patches into the purified image (training only).

    The release's mask: shuffle the L patches (argsort of uniform noise), cut the shuffled order
    at round(linspace(0, L - 1, k + 1)) (half to even) with k uniform in [min_chunks, max_chunks],
    and give mask 0 (adversarial) to chunk j, j uniform in [0, k). The cut points come from
    linspace(0, L - 1) as in the release, so the last shuffled patch is never pasted.

    Args:
        patch_size: side of a mask patch (the purifier's patch size).
        max_chunks: largest k (release ``mask_chunks`` = 4).
        min_chunks: smallest k (2 in the release).
    """

    def __init__(self, patch_size: int, max_chunks: int = 4, min_chunks: int = 2):
        super().__init__()
        if not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
        if not 1 <= min_chunks <= max_chunks:
            raise ValueError(f"need 1 <= min_chunks <= max_chunks, got min_chunks={min_chunks}, max_chunks={max_chunks}")
        self.patch_size, self.max_chunks, self.min_chunks = patch_size, max_chunks, min_chunks

    def draw(
        self, batch_size: int, num_patches: int, generator: Optional[torch.Generator] = None, device=None
    ) -> RandomCombinationDraws:
        """Draw in the release's order: noise (N, L), then k, then j (draws on the generator's device)."""
        gen_device = generator.device if generator is not None else device
        noise = torch.rand(batch_size, num_patches, generator=generator, device=gen_device)
        k = int(torch.randint(self.min_chunks, self.max_chunks + 1, (1,), generator=generator, device=gen_device))
        j = int(torch.randint(k, (1,), generator=generator, device=gen_device))
        return RandomCombinationDraws(noise.to(device) if device is not None else noise, k, j)

    @staticmethod
    def patch_mask(draws: RandomCombinationDraws) -> torch.Tensor:
        """(N, L) float mask in patch order: 0 for the patches of chunk j, 1 elsewhere."""
        noise, k, j = draws.noise, draws.num_chunks, draws.chunk_index
        if not 0 <= j < k:
            raise ValueError(f"chunk_index must lie in [0, num_chunks={k}), got {j}")
        num_patches = noise.shape[1]
        # float64 linspace and round-half-to-even reproduce numpy's cut points exactly
        bounds = torch.linspace(0, num_patches - 1, k + 1, dtype=torch.float64).round().long().tolist()
        shuffled = torch.ones_like(noise)
        shuffled[:, bounds[j] : bounds[j + 1]] = 0
        rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # shuffled position of each patch
        return torch.gather(shuffled, 1, rank)

    def forward(
        self,
        purified: torch.Tensor,
        adversarial: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        draws: Optional[RandomCombinationDraws] = None,
    ) -> RandomCombinationOutput:
        """Mix (N, C, H, W) purified and adversarial images patch-wise; ``draws`` replays a mask."""
        if purified.shape != adversarial.shape or purified.dim() != 4:
            raise ValueError(
                f"purified {tuple(purified.shape)} and adversarial {tuple(adversarial.shape)} must be equal (N, C, H, W) shapes"
            )
        N, _, H, W = purified.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the RCM patch size {p}")
        h, w = H // p, W // p
        if draws is None:
            draws = self.draw(N, h * w, generator, purified.device)
        elif draws.noise.shape != (N, h * w):
            raise ValueError(f"draws.noise must have shape (N, L) = ({N}, {h * w}), got {tuple(draws.noise.shape)}")
        mask = self.patch_mask(draws).to(purified).view(N, 1, h, 1, w, 1)
        mask = mask.expand(N, 1, h, p, w, p).reshape(N, 1, H, W).expand_as(purified)
        return RandomCombinationOutput(mixed=purified * mask + adversarial * (1 - mask), mask=mask)


# ---------------------------------------------------------------------------------- objective
class PurificationLoss(nn.Module):
    """The IMPure training objective on one batch.

    ``loss(reconstruction, clean, adversarial)`` with ``reconstruction`` the purifier's output in
    its normalised space (``ImpureOutput.reconstruction``) and [0, 1] images returns
    ``{"pixel": ..., "perceptual/<layer>": ..., "loss": total}``. The perceptual term compares
    the RCM mix of the un-normalised (unclamped) reconstruction and the adversarial input with
    the clean image; without ``rcm`` the reconstruction itself is compared.

    Args:
        image_mean / image_std: the purifier's normalisation (``config.image_mean`` / ``image_std``).
        perceptual: a [`PerceptualLoss`] or None (pixel loss only).
        rcm: a [`RandomCombination`] or None.
    """

    def __init__(
        self,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        perceptual: Optional[PerceptualLoss] = None,
        rcm: Optional[RandomCombination] = None,
    ):
        super().__init__()
        self.perceptual, self.rcm = perceptual, rcm
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(
        self,
        reconstruction: torch.Tensor,
        clean: torch.Tensor,
        adversarial: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        rcm_draws: Optional[RandomCombinationDraws] = None,
    ) -> dict[str, torch.Tensor]:
        terms = {"pixel": pixel_loss(reconstruction, (clean - self.image_mean) / self.image_std)}
        if self.perceptual is not None:
            purified = reconstruction * self.image_std + self.image_mean  # new tensor: no in-place un-normalisation
            if self.rcm is not None:
                purified = self.rcm(purified, adversarial, generator=generator, draws=rcm_draws).mixed
            perceptual = self.perceptual(purified, clean)
            perceptual.pop("total")
            terms.update({f"perceptual/{name}": value for name, value in perceptual.items()})
        terms["loss"] = torch.stack(list(terms.values())).sum()
        return terms


__all__ = [
    "pixel_loss",
    "PerceptualLoss",
    "RandomCombination",
    "RandomCombinationDraws",
    "RandomCombinationOutput",
    "PurificationLoss",
    "VGG19_PAPER_LAYERS",
    "VGG19_BN_RELEASE_LAYERS",
]
