"""Baseline purifiers: interface, each defence's defining behaviour, the harmonic control's rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impure_hf.baselines import (
    BASELINES,
    BitDepthReduction,
    HarmonicInpainting,
    JPEGCompression,
    MedianSmoothing,
    RandomResizePad,
    TotalVariationDenoising,
    build_baseline,
)

from conftest import real_photos


@pytest.fixture(scope="module")
def photos96() -> torch.Tensor:
    return real_photos(size=96, n=2)


def _parity_subsets(height: int, width: int, patch: int) -> torch.Tensor:
    """(H, W) subset index of each pixel under RIAE's uniform division with S = 4."""
    rows = torch.arange(height) // patch
    cols = torch.arange(width) // patch
    return (rows[:, None] % 2) * 2 + cols[None, :] % 2


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_keeps_shape_range_and_passes_gradients(name, photos96):
    purifier = build_baseline(name)
    x = photos96.clone().requires_grad_(True)
    out = purifier(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0 <= out.min() and out.max() <= 1
    out.sum().backward()  # white-box attacks need a gradient through every defence (or BPDA)
    assert x.grad is not None and x.grad.abs().sum() > 0
    if not purifier.differentiable:  # BPDA: exactly the identity's gradient
        assert torch.equal(x.grad, torch.ones_like(x))
    no_grad = purifier.purify(photos96, generator=torch.Generator().manual_seed(0))
    assert not no_grad.requires_grad
    torch.testing.assert_close(no_grad, out.detach())


def test_harmonic_control_never_uses_a_pixels_own_subset(photos96):
    # 88 x 72 at patch 16 also exercises partial patches along the bottom and right edges
    x = photos96[:1, :, :88, :72]
    control = HarmonicInpainting(patch_size=16)
    out = control(x)
    subset = _parity_subsets(88, 72, 16)
    gen = torch.Generator().manual_seed(0)
    for k in range(4):
        changed = x.clone()
        changed[..., subset == k] = torch.rand(changed[..., subset == k].shape, generator=gen)
        moved = control(changed)
        assert torch.equal(moved[..., subset == k], out[..., subset == k])  # own subset: no effect
        assert (moved[..., subset != k] - out[..., subset != k]).abs().max() > 0.05  # it does fill the others


def test_harmonic_control_solves_laplace_exactly():
    # a linear ramp is harmonic: every patch away from the image border is rebuilt exactly
    rows, cols = torch.meshgrid(torch.linspace(0.1, 0.9, 64), torch.linspace(0.2, 0.7, 64), indexing="ij")
    ramp = torch.stack([rows, cols, (rows + cols) / 2]).unsqueeze(0)
    out = HarmonicInpainting(patch_size=8)(ramp)
    torch.testing.assert_close(out[..., 8:-8, 8:-8], ramp[..., 8:-8, 8:-8], atol=1e-5, rtol=0)
    # and a non-harmonic photo is not returned unchanged
    photo = real_photos(size=64, n=1)
    assert (HarmonicInpainting(patch_size=8)(photo) - photo).abs().mean() > 0.01


def test_harmonic_control_rejects_a_single_patch():
    with pytest.raises(ValueError, match="single 16-pixel patch"):
        HarmonicInpainting(patch_size=16)(torch.rand(1, 3, 16, 16))


def test_jpeg_outputs_8_bit_images_and_quality_controls_the_error(photos96):
    errors = {}
    for quality in (10, 50, 95):
        out = JPEGCompression(quality=quality)(photos96)
        assert torch.equal(out * 255, (out * 255).round())
        errors[quality] = (out - photos96).abs().mean().item()
    assert errors[10] > errors[50] > errors[95]
    assert errors[95] < 0.02
    with pytest.raises(ValueError, match="quality"):
        JPEGCompression(quality=0)


def test_bit_depth_keeps_exactly_2_to_the_bits_levels(photos96):
    for bits in (1, 3):
        out = BitDepthReduction(bits=bits)(photos96)
        levels = torch.unique(out)
        assert len(levels) <= 2**bits
        torch.testing.assert_close(levels * (2**bits - 1), (levels * (2**bits - 1)).round())
        assert (out - photos96).abs().max() <= 0.5 / (2**bits - 1) + 1e-6
    # 8 bits leaves an image already on the 8-bit grid unchanged
    on_grid = (photos96 * 255).round() / 255
    torch.testing.assert_close(BitDepthReduction(bits=8)(on_grid), on_grid)


def test_median_matches_scipy_and_removes_impulse_noise(photos96):
    from scipy.ndimage import median_filter

    out = MedianSmoothing(kernel_size=3)(photos96)
    # torch's "reflect" padding is scipy's "mirror"
    expected = median_filter(photos96.numpy(), size=(1, 1, 3, 3), mode="mirror")
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-7)
    gen = torch.Generator().manual_seed(0)
    salt = torch.rand(photos96.shape, generator=gen) < 0.05
    noisy = torch.where(salt, torch.rand(photos96.shape, generator=gen).round(), photos96)
    denoised = MedianSmoothing(kernel_size=3)(noisy)
    assert ((denoised - photos96) ** 2).mean() < 0.3 * ((noisy - photos96) ** 2).mean()


def test_random_resize_pad_is_random_but_reproducible(photos96):
    purifier = RandomResizePad()
    assert purifier.stochastic and purifier.differentiable
    first = purifier(photos96, generator=torch.Generator().manual_seed(1))
    again = purifier(photos96, generator=torch.Generator().manual_seed(1))
    other = purifier(photos96, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # a zero border appears (the padding) and the content is shrunk, not cropped
    assert (first == 0).any() and (first - photos96).abs().mean() > 0.01


def test_tv_reduces_total_variation_of_a_noisy_photo(photos96):
    gen = torch.Generator().manual_seed(0)
    noisy = (photos96 + 0.1 * torch.randn(photos96.shape, generator=gen)).clamp(0, 1)

    def total_variation(x):
        return (x.diff(dim=-1).abs().sum() + x.diff(dim=-2).abs().sum()).item()

    denoised = TotalVariationDenoising(weight=0.1)(noisy)
    assert total_variation(denoised) < 0.5 * total_variation(noisy)
    assert (denoised - photos96).abs().mean() < (noisy - photos96).abs().mean()


def test_build_baseline_parses_parameters_and_rejects_bad_specs():
    assert build_baseline("jpeg:quality=50").quality == 50
    assert build_baseline("harmonic:patch_size=8").label == "harmonic(patch_size=8)"
    with pytest.raises(ValueError, match="unknown baseline 'blur'"):
        build_baseline("blur")
    with pytest.raises(ValueError, match="not key=value"):
        build_baseline("jpeg:50")
    with pytest.raises(ValueError, match="bad parameters for baseline 'jpeg'"):
        build_baseline("jpeg:qualty=50")
    with pytest.raises(TypeError, match="floating-point"):
        build_baseline("median")(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
