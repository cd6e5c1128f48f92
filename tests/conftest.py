"""Shared test helpers: tiny configurations and real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impure_hf import ImpureConfig, ImpureModel

TINY = dict(
    image_size=32,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    decoder_hidden_size=24,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=3,
    decoder_intermediate_size=48,
    fusion_layers=(0, 2),
)


def tiny_config(**overrides) -> ImpureConfig:
    return ImpureConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> ImpureModel:
    torch.manual_seed(seed)
    model = ImpureModel(tiny_config(**overrides))
    # perturb every parameter so no weight is trivial (LayerNorm ones, zero biases, equal fusion weights)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def real_photos(size: int = 32, n: int = 3) -> torch.Tensor:
    """skimage's astronaut, chelsea, coffee (real photos): centre-cropped, resized, in [0, 1]."""
    from PIL import Image
    from skimage import data

    images = []
    for name in ("astronaut", "chelsea", "coffee", "rocket")[:n]:
        array = getattr(data, name)()
        h, w = array.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        pil = Image.fromarray(array[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(images)


@pytest.fixture
def photos() -> torch.Tensor:
    return real_photos()
