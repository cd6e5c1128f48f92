"""Shared helpers for the classifier, attack and dataset tests: real EfficientNet-Lite0 weights and
foolbox's labelled ImageNet photos (all offline)."""

from __future__ import annotations

from functools import lru_cache

import torch
from PIL import Image

from impure_hf.classifiers import ImageClassifier, load_classifier
from impure_hf.data import foolbox_imagenet_samples
from impure_hf.image_processing_impure import ImpureImageProcessor


@lru_cache(maxsize=None)
def lite0() -> ImageClassifier:
    """EfficientNet-Lite0 with its real ImageNet weights, at its native 224 px."""
    return load_classifier("efficientnet_lite0")


@lru_cache(maxsize=None)
def lite0_small(size: int = 64) -> ImageClassifier:
    """The same weights behind a ``size`` px input: about 12x cheaper, for tests of mechanics."""
    full = lite0()
    return ImageClassifier(full.model, size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), full.labels, name=f"lite0-{size}px")


def foolbox_batch(size: int = 224, n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` foolbox ImageNet photos, resized and centre-cropped to ``size``, with their labels."""
    processor = ImpureImageProcessor(crop_size=size)
    samples = foolbox_imagenet_samples()[:n]
    images = torch.cat([processor(Image.open(path))["pixel_values"] for path, _ in samples])
    return images, torch.tensor([label for _, label in samples])
