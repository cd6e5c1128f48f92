"""Small helpers shared across the package (file listing, process state, parsing, atomic writes).

Imports nothing else of the package (DESIGN.md section 7), so any module may use it.
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

# ---------------------------------------------------------------------------------- files, processes, parsing
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def iter_image_files(paths: Iterable) -> list[Path]:
    """Image files from files and folders (folders searched recursively, sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no image files in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image file or folder: {path}")
    return files


def process_state() -> PartialState:
    """accelerate's process state; on CPUs (gloo) accelerate forms the process group only when told so."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def parse_eps(text: str) -> float:
    """``"16/255"`` or ``"0.0627"`` -> float (argparse type)."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"eps must be a number or a fraction like 16/255, got {text!r}") from None
