"""Baseline purifiers: the usual input-transformation defences and a non-learned RIAE control.

Every baseline has the calling convention of ``ImpureModel``'s purify path, so the evaluation
tables come from one loop: ``purifier(pixel_values, generator=None)`` takes [0, 1] images
(N, C, H, W) and returns [0, 1] images of the same shape; ``purifier.purify(...)`` does the same
without gradients. Stochastic baselines draw from ``generator``.

Defences that are not differentiable (JPEG, bit depth, TV, wavelet) return their output with the
gradient of the identity (BPDA, Athalye et al. 2018), so white-box attacks run through them.

Build one by name with ``build_baseline("jpeg")`` or with parameters,
``build_baseline("harmonic:patch_size=8")``; ``BASELINES`` maps names to classes.
"""

from __future__ import annotations

import ast
import io
from typing import Optional

import numpy as np
import pywt
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.restoration import denoise_tv_chambolle, denoise_wavelet
from torch import nn

from .layers_impure import HarmonicPatchFill


def _check_pixels(pixel_values: torch.Tensor) -> None:
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a floating-point tensor in [0, 1], got dtype {pixel_values.dtype}")
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must have shape (N, C, H, W), got {tuple(pixel_values.shape)}")


def _randint(low: int, high: int, generator: Optional[torch.Generator]) -> int:
    """One integer in [low, high) from the generator (on the generator's own device)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(low, high, (1,), generator=generator, device=device))


class Purifier(nn.Module):
    """Base class of the baseline purifiers.

    Subclasses implement ``transform(pixel_values, generator)`` and set the class attributes
    ``name`` (registry key), ``stochastic`` (the output depends on the generator) and
    ``differentiable`` (``transform`` has useful gradients; otherwise BPDA is used).
    """

    name: str = ""
    stochastic: bool = False
    differentiable: bool = True

    def transform(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def label(self) -> str:
        """Name and parameters, for tables: ``jpeg(quality=75)``."""
        params = self.extra_repr()
        return f"{self.name}({params})" if params else self.name

    def forward(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_pixels(pixel_values)
        if self.differentiable:
            return self.transform(pixel_values, generator)
        with torch.no_grad():
            purified = self.transform(pixel_values.detach(), generator)
        # BPDA: the defence's values, the identity's gradient (x - x.detach() is exactly zero)
        return purified + (pixel_values - pixel_values.detach())

    @torch.no_grad()
    def purify(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Purified images in [0, 1] without gradients (as ``ImpureModel.purify``)."""
        return self(pixel_values, generator=generator)


class IdentityPurifier(Purifier):
    """Returns its input: the control that must score exactly as no defence."""

    name = "identity"

    def transform(self, pixel_values, generator):
        return pixel_values


class JPEGCompression(Purifier):
    """JPEG encode/decode at ``quality`` (Dziugaite et al. 2016; Guo et al. 2018), Pillow's codec."""

    name = "jpeg"
    differentiable = False

    def __init__(self, quality: int = 75):
        super().__init__()
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must lie in [1, 100], got {quality}")
        self.quality = int(quality)

    def extra_repr(self) -> str:
        return f"quality={self.quality}"

    def transform(self, pixel_values, generator):
        if pixel_values.shape[1] not in (1, 3):
            raise ValueError(f"JPEG needs 1 or 3 channels, got {pixel_values.shape[1]}")
        arrays = (pixel_values.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        decoded = []
        for array in arrays:
            buffer = io.BytesIO()
            Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(
                buffer, format="JPEG", quality=self.quality
            )
            decoded.append(np.asarray(Image.open(buffer)).reshape(array.shape))
        return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).to(pixel_values) / 255


class BitDepthReduction(Purifier):
    """Quantise each channel to ``bits`` bits (feature squeezing, Xu et al. 2018)."""

    name = "bitdepth"
    differentiable = False  # piecewise constant: its true gradient is zero almost everywhere

    def __init__(self, bits: int = 4):
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must lie in [1, 8], got {bits}")
        self.bits = int(bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def transform(self, pixel_values, generator):
        levels = 2**self.bits - 1
        return (pixel_values.clamp(0, 1) * levels).round() / levels


class MedianSmoothing(Purifier):
    """Median over a ``kernel_size`` window per channel, reflect-padded (feature squeezing).

    Computed with ``unfold`` in torch, so it is differentiable (the gradient reaches the median
    pixel of each window).
    """

    name = "median"

    def __init__(self, kernel_size: int = 3):
        super().__init__()
        if kernel_size < 2:
            raise ValueError(f"kernel_size must be at least 2, got {kernel_size}")
        self.kernel_size = int(kernel_size)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"

    def transform(self, pixel_values, generator):
        k = self.kernel_size
        n, c, h, w = pixel_values.shape
        # (left, right, top, bottom); an even window takes the extra pixel on the bottom/right
        padded = F.pad(pixel_values, ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2), mode="reflect")
        windows = F.unfold(padded.reshape(n * c, 1, *padded.shape[-2:]), kernel_size=k)  # (NC, k*k, HW)
        return windows.median(dim=1).values.reshape(n, c, h, w)


class RandomResizePad(Purifier):
    """Random resizing and padding (Xie et al. 2018), stochastic and differentiable.

    Each image is resized to a random size between its own and ``scale`` times it (299 -> [299, 331)
    in the paper), zero-padded at a random offset to ``scale`` times its size, and resized back
    to the input size, so every purifier keeps shapes (the classifier resizes to its own input
    size anyway).
    """

    name = "resize-pad"
    stochastic = True

    def __init__(self, scale: float = 331 / 299):
        super().__init__()
        if scale <= 1:
            raise ValueError(f"scale must be above 1, got {scale}")
        self.scale = float(scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.3f}"

    def transform(self, pixel_values, generator):
        h, w = pixel_values.shape[-2:]
        out_h, out_w = round(h * self.scale), round(w * self.scale)
        purified = []
        for image in pixel_values.split(1):
            new_h = _randint(h, out_h, generator)
            new_w = min(round(w * new_h / h), out_w)
            top = _randint(0, out_h - new_h + 1, generator)
            left = _randint(0, out_w - new_w + 1, generator)
            resized = F.interpolate(image, size=(new_h, new_w), mode="bilinear", align_corners=False)
            padded = F.pad(resized, (left, out_w - new_w - left, top, out_h - new_h - top))
            purified.append(F.interpolate(padded, size=(h, w), mode="bilinear", align_corners=False, antialias=True))
        return torch.cat(purified).clamp(0, 1)


class _PerImageNumpy(Purifier):
    """A scikit-image filter applied image by image on (H, W, C) float64 arrays."""

    differentiable = False

    def filter(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def transform(self, pixel_values, generator):
        arrays = pixel_values.clamp(0, 1).permute(0, 2, 3, 1).cpu().double().numpy()
        out = np.stack([self.filter(image) for image in arrays])
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(pixel_values).clamp(0, 1)


class TotalVariationDenoising(_PerImageNumpy):
    """Total-variation minimisation (Guo et al. 2018): ``skimage.restoration.denoise_tv_chambolle``."""

    name = "tv"

    def __init__(self, weight: float = 0.1):
        super().__init__()
        if weight <= 0:
            raise ValueError(f"TV weight must be positive, got {weight}")
        self.weight = float(weight)

    def extra_repr(self) -> str:
        return f"weight={self.weight:g}"

    def filter(self, image):
        return denoise_tv_chambolle(image, weight=self.weight, channel_axis=-1)


class WaveletDenoising(_PerImageNumpy):
    """Wavelet soft-thresholding (BayesShrink in YCbCr), ``skimage.restoration.denoise_wavelet``.

    Needs PyWavelets (``pip install PyWavelets``). ``sigma=None`` estimates the noise level per image.
    """

    name = "wavelet"

    def __init__(self, sigma: Optional[float] = None, wavelet: str = "db1"):
        super().__init__()
        if wavelet not in pywt.wavelist():
            raise ValueError(f"unknown wavelet {wavelet!r}; see pywt.wavelist()")
        self.sigma = sigma
        self.wavelet = wavelet

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, wavelet={self.wavelet}"

    def filter(self, image):
        return denoise_wavelet(
            image,
            sigma=self.sigma,
            wavelet=self.wavelet,
            mode="soft",
            method="BayesShrink",
            convert2ycbcr=True,
            channel_axis=-1,
            rescale_sigma=True,
        )


class HarmonicInpainting(Purifier):
    """Non-learned control with RIAE's rule: no output pixel is computed from its own patch subset.

    The image is cut into ``patch_size`` patches and divided like RIAE's uniform division (patch
    (r, c) in subset (r % 2) * 2 + c % 2 for S = 4). Each subset is filled by harmonic inpainting
    (the discrete Laplace equation) from the pixels of the other subsets: see
    [`~impure_hf.layers_impure.HarmonicPatchFill`], which the model's ``residual_fill="harmonic"``
    option shares. Linear, so exactly differentiable.
    """

    name = "harmonic"

    def __init__(self, patch_size: int = 16):
        super().__init__()
        self.fill = HarmonicPatchFill(patch_size)

    @property
    def patch_size(self) -> int:
        return self.fill.patch_size

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}"

    def transform(self, pixel_values, generator):
        return self.fill(pixel_values).clamp(0, 1)


BASELINES: dict[str, type[Purifier]] = {
    cls.name: cls
    for cls in (
        IdentityPurifier,
        JPEGCompression,
        BitDepthReduction,
        MedianSmoothing,
        RandomResizePad,
        TotalVariationDenoising,
        WaveletDenoising,
        HarmonicInpainting,
    )
}

# the simple baselines of the evaluation table (identity is a control for tests)
DEFAULT_BASELINES = ("jpeg", "bitdepth", "median", "resize-pad", "tv", "harmonic")


def build_baseline(spec: str, **overrides) -> Purifier:
    """A baseline from ``"name"`` or ``"name:key=value,key=value"`` (values are Python literals).

    >>> build_baseline("jpeg:quality=50").label
    'jpeg(quality=50)'
    """
    name, _, params = spec.partition(":")
    name = name.strip()
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known baselines: {sorted(BASELINES)}")
    kwargs = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"baseline parameter {item!r} in {spec!r} is not key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    kwargs.update(overrides)
    try:
        return BASELINES[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad parameters for baseline {name!r}: {err}") from err


__all__ = [
    "BASELINES",
    "DEFAULT_BASELINES",
    "BitDepthReduction",
    "HarmonicInpainting",
    "IdentityPurifier",
    "JPEGCompression",
    "MedianSmoothing",
    "Purifier",
    "RandomResizePad",
    "TotalVariationDenoising",
    "WaveletDenoising",
    "build_baseline",
]
