"""Inference precision: fp32, bf16 autocast, or ``auto`` (bf16 only where it is measured faster here).

Why measure instead of guess: bf16 autocast purified 3x faster than fp32 on one 2-core AMD EPYC with
avx512_bf16 and was slower than fp32 on an Intel Xeon without it; GPUs differ too. ``auto`` times
both on this machine, on real photos at the model's size, and keeps bf16 only where it is faster by
``SPEEDUP`` and its output agrees with fp32's (PSNR of at least ``AGREEMENT_PSNR_DB`` for the same
noise). So ``auto`` never picks a precision that is slower than fp32 where it runs.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .photos import OFFLINE_PHOTOS, package_file, random_photo_crops

DTYPES = ("auto", "fp32", "bf16")
AGREEMENT_PSNR_DB = 40.0
SPEEDUP = 1.1  # bf16 must be at least 10 % faster: timings on a busy machine wobble by a few percent


@dataclass
class DtypeChoice:
    """What ``choose_dtype`` picked and why (the timings and agreement it measured, if any)."""

    dtype: str
    reason: str
    fp32_seconds: Optional[float] = None
    bf16_seconds: Optional[float] = None
    psnr_db: Optional[float] = None

    def __str__(self) -> str:
        return f"precision: {self.dtype} ({self.reason})"


def autocast(dtype: str, device: torch.device):
    """The context that runs a forward in ``dtype`` ("fp32": none; "bf16": torch.autocast)."""
    if dtype == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    if dtype == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"dtype must be one of {DTYPES[1:]} here, got {dtype!r}")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return dtype


def _probe_photos(size: int, n: int) -> torch.Tensor:
    """Crops of real photos (the offline validation photos, never a test photo) at size x size in [0, 1]."""
    return random_photo_crops([package_file(name) for name in OFFLINE_PHOTOS["validation"]], n, size=size, seed=0)


def _purify(model, pixels: torch.Tensor, dtype: str, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=pixels.device).manual_seed(seed)
    with torch.inference_mode(), autocast(dtype, pixels.device):
        return model(pixels, generator=generator).purified_pixel_values.float()


def choose_dtype(
    model,
    dtype: str = "auto",
    image_size: Optional[int] = None,
    batch_size: int = 2,
    repeats: int = 3,
) -> DtypeChoice:
    """Resolve ``dtype`` ("auto", "fp32" or "bf16") for purifying with ``model`` on its device.

    "auto" runs one warm-up and ``repeats`` interleaved timed forwards of ``batch_size`` real photos
    at ``image_size`` (default: the model's) in each precision, and picks bf16 only where its median
    time is ``SPEEDUP`` times lower and its output agrees with fp32's (PSNR >= ``AGREEMENT_PSNR_DB``).
    """
    check_dtype(dtype)
    if dtype != "auto":
        return DtypeChoice(dtype, "requested")
    device = next(model.parameters()).device
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return DtypeChoice("fp32", "this GPU has no bf16")
    size = image_size or model.config.image_size
    pixels = _probe_photos(size, batch_size).to(device)
    was_training = model.training
    model.eval()
    try:
        outputs = {d: _purify(model, pixels, d, seed=0) for d in ("fp32", "bf16")}  # warm-up, and the agreement
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(repeats):
            for d in ("fp32", "bf16"):  # interleaved, so a busy moment hits both
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                _purify(model, pixels, d, seed=0)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[d].append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    mse = (outputs["fp32"] - outputs["bf16"]).pow(2).mean().clamp_min(1e-12)
    psnr = float(10 * torch.log10(1 / mse))
    fp32_s, bf16_s = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    measured = dict(fp32_seconds=fp32_s, bf16_seconds=bf16_s, psnr_db=psnr)
    speed = f"bf16 {bf16_s / batch_size * 1000:.0f} ms/img vs fp32 {fp32_s / batch_size * 1000:.0f} ms/img"
    if psnr < AGREEMENT_PSNR_DB:
        return DtypeChoice("fp32", f"bf16 output only {psnr:.1f} dB from fp32's; {speed}", **measured)
    if bf16_s * SPEEDUP > fp32_s:
        return DtypeChoice("fp32", f"bf16 not faster here: {speed}", **measured)
    return DtypeChoice("bf16", f"measured faster here: {speed}; {psnr:.1f} dB from fp32", **measured)


def set_precision(model, dtype: str = "auto", **measure) -> DtypeChoice:
    """Resolve ``dtype`` for ``model`` (see ``choose_dtype``) and make its forward run in it.

    Sets ``model.autocast_dtype`` (bf16 autocast, or None for fp32) and returns the choice, whose
    ``str`` is the line the command-line tools print.
    """
    model.autocast_dtype = None  # measure from fp32, whatever was set before
    choice = choose_dtype(model, dtype, **measure)
    model.autocast_dtype = torch.bfloat16 if choice.dtype == "bf16" else None
    return choice
