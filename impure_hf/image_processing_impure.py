"""Image processor for IMPure: any image -> (N, 3, S, S) float tensor in [0, 1].

No normalisation here: the model normalises internally, so purified outputs stay in [0, 1] and
can be fed to any classifier. This file travels into Hub folders as remote code.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]


# 16-bit grey modes, as PIL opens 16-bit PNG and TIFF files
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_FLOAT_TOLERANCE = 1e-3  # float images may overshoot [0, 1] by rounding; beyond this it is a different range


def _to_uint8(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Values in [low, high] -> uint8 0..255 (rounded)."""
    scaled = (array.astype(np.float64) - low) / max(high - low, np.finfo(np.float64).tiny)
    return (np.clip(scaled, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _grey_by_range(image: Image.Image) -> Image.Image:
    """PIL's 16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) modes -> ``L``, scaled by
    their range: PIL's own ``convert`` clips them to 0..255 (16-bit turns white, float [0, 1] black)."""
    array = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_to_uint8(array, 0, 65535))
    if not np.isfinite(array).all():
        raise ValueError(f"image (mode {image.mode}) contains NaN or inf")
    low, high = float(array.min()), float(array.max())
    if image.mode == "F" and low >= -_FLOAT_TOLERANCE and high <= 1 + _FLOAT_TOLERANCE:
        return Image.fromarray(_to_uint8(array, 0, 1))
    if low >= 0 and high <= (255 if image.mode == "F" else 65535):
        return Image.fromarray(_to_uint8(array, 0, 255 if image.mode == "F" else 65535))
    warnings.warn(f"image of mode {image.mode} has values in [{low:.6g}, {high:.6g}]: scaled from its own minimum and maximum")
    return Image.fromarray(_to_uint8(array, low, high))


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)  # phone photos: stored sideways, an EXIF tag says how to turn them
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return _grey_by_range(image).convert("RGB")
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiply first
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # composite transparency on white rather than dropping alpha into black
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, HSV, RGBX ...


def to_pil_rgb(image: ImageLike) -> Image.Image:
    """PIL / numpy (HWC or CHW) / torch (CHW) -> 8-bit RGB PIL image: the one conversion rule.

    PIL images: EXIF orientation applied; 16-bit, 32-bit and float modes scaled by their range;
    alpha composited on white; palette, CMYK and the other modes converted.
    Arrays: uint8 as is, uint16 scaled by 65535, bool as black/white, float must lie in [0, 1]
    (a ``ValueError`` otherwise, e.g. for 0..255 floats: divide them by 255).
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    array = image
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or array.size == 0:
        raise ValueError(f"cannot read an image of shape {image.shape}: expected HW, HWC or CHW with 1, 3 or 4 channels")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = _to_uint8(array, 0, 65535)
    elif array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"integer images must be uint8 or uint16, got {array.dtype}")
        if not np.isfinite(array).all():
            raise ValueError("image contains NaN or inf")
        low, high = float(array.min()), float(array.max())
        if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
            raise ValueError(
                f"float images must lie in [0, 1], got values in [{low:.6g}, {high:.6g}]"
                + (" (0..255 data: divide by 255)" if high <= 255 and low >= 0 else "")
            )
        array = _to_uint8(array, 0, 1)
    return _pil_to_rgb(Image.fromarray(array))


class ImpureImageProcessor(BaseImageProcessor):
    r"""The one preprocessing rule of every entry point (training, evaluation, ``impure purify``,
    the page, Hub folders, the dataset builder): resize the shortest edge to
    ``size["shortest_edge"]``, centre-crop to ``crop_size`` and rescale to [0, 1].

    The default shortest edge is the crop side, so the whole short side of an image is kept (the
    framing the trained weights were evaluated with); ``size={"shortest_edge": 256}`` with a 224
    crop gives the usual ImageNet 0.875 centre crop.

    Args:
        crop_size: output side: an int or transformers' ``{"height": S, "width": S}`` (square, the
            model's ``image_size``).
        size: shortest edge before cropping: transformers' ``{"shortest_edge": N}`` or an int
            (default: the crop side). ``resize_shortest_edge`` is its earlier name, still read
            from saved configs. Set ``do_resize=False`` to crop only.
        resample: PIL resampling filter (default bicubic).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        crop_size: Union[int, dict] = 224,
        size: Union[int, dict, None] = None,
        do_resize: bool = True,
        do_center_crop: bool = True,
        resample: int = int(Image.Resampling.BICUBIC),
        resize_shortest_edge: Optional[int] = None,
        **kwargs,
    ):
        # BaseImageProcessor.__init__ only stores extra kwargs; our attributes are explicit
        super().__init__(**kwargs)
        side = crop_size.get("height") if isinstance(crop_size, dict) else crop_size
        if isinstance(crop_size, dict) and crop_size.get("width", side) != side:
            raise ValueError(f"crop_size must be square (the model's image_size), got {crop_size}")
        if not isinstance(side, int) or isinstance(side, bool) or side <= 0:
            raise ValueError(f"crop_size must be a positive integer, got {crop_size!r}")
        edge = size.get("shortest_edge") if isinstance(size, dict) else size
        if edge is not None and resize_shortest_edge is not None and edge != resize_shortest_edge:
            raise ValueError(f"size {size!r} and resize_shortest_edge {resize_shortest_edge} disagree; give size only")
        edge = side if edge is None and resize_shortest_edge is None else (edge or resize_shortest_edge)
        if not isinstance(edge, int) or isinstance(edge, bool) or edge <= 0:
            raise ValueError(f"size must be a positive integer or {{'shortest_edge': N}}, got {size!r}")
        self.crop_size = {"height": side, "width": side}
        self.size = {"shortest_edge": edge}
        self.do_resize = do_resize
        self.do_center_crop = do_center_crop
        self.resample = int(resample)

    def _one(self, image: ImageLike) -> np.ndarray:
        pil = to_pil_rgb(image)
        side = self.crop_size["height"]
        if self.do_resize:
            w, h = pil.size
            scale = self.size["shortest_edge"] / min(w, h)
            pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample=self.resample)
        if self.do_center_crop:
            w, h = pil.size
            if min(w, h) < side:
                raise ValueError(f"image of size {w}x{h} is smaller than crop_size {side}; enable do_resize")
            left, top = (w - side) // 2, (h - side) // 2
            pil = pil.crop((left, top, left + side, top + side))
        return np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0

    def preprocess(self, images, return_tensors: Optional[str] = "pt", **kwargs) -> BatchFeature:
        """One image or a list -> ``BatchFeature(pixel_values=(N, 3, S, S) in [0, 1])``."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if isinstance(images, (Image.Image, np.ndarray)) or (isinstance(images, torch.Tensor) and images.dim() <= 3):
            images = [images]
        elif isinstance(images, torch.Tensor):
            images = list(images)
        arrays = [self._one(image) for image in images]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError("images of different sizes cannot be batched; enable do_resize and do_center_crop")
        return BatchFeature({"pixel_values": np.stack(arrays)}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    @staticmethod
    def post_process(pixel_values: torch.Tensor) -> list[Image.Image]:
        """(N, 3, H, W) or (3, H, W) in [0, 1] -> list of RGB PIL images (rounded to uint8)."""
        if pixel_values.dim() == 3:
            pixel_values = pixel_values.unsqueeze(0)
        arrays = (pixel_values.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arrays]


__all__ = ["ImpureImageProcessor", "to_pil_rgb"]
