"""The images an evaluation runs on: foolbox's labelled photos, an image folder, or a built dataset."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from .._utils import iter_image_files
from ..data import BUILD_DIR, load_adversarial_dataset
from ..photos import foolbox_imagenet_samples
from ..image_processing_impure import ImpureImageProcessor


@dataclass
class EvalImages:
    """Images to evaluate on: (N, 3, S, S) in [0, 1], labels (N,) or None (use predictions), ids."""

    pixel_values: torch.Tensor
    labels: Optional[torch.Tensor]
    ids: list[str]
    source: str


def _label_from_name(path: Path) -> Optional[int]:
    """The class index at the end of a file name (``imagenet_03_990.jpg`` -> 990), if any."""
    match = re.search(r"_(\d+)$", path.stem)
    return int(match.group(1)) if match else None


def _is_dataset(data: str) -> bool:
    """A built adversarial dataset (folder from ``impure make-dataset``) or a Hub dataset id."""
    path = Path(data)
    if not path.exists():
        return True
    return path.is_dir() and ((path / BUILD_DIR).is_dir() or any((path / "data").glob("*.parquet")))


def load_eval_images(
    data: Optional[str] = None,
    split: str = "test",
    image_size: int = 224,
    max_images: Optional[int] = None,
) -> EvalImages:
    """Evaluation images from foolbox's labelled photos (``data=None``), an image folder or a dataset.

    - An image folder: labels are read from file names ending in ``_<class index>`` when every file
      has one; otherwise there are none and each classifier's clean predictions serve as labels.
    - A built adversarial dataset (``impure make-dataset`` folder or Hub id): the distinct clean
      images of ``split`` and their labels (the attacks are crafted again here, so every threat
      model uses the same settings).

    Images are framed by ``ImpureImageProcessor``'s one rule: shortest edge resized to
    ``image_size``, centre crop.
    """

    if data is not None and _is_dataset(str(data)):
        images, labels, ids = _dataset_images(str(data), split, max_images)
        source = f"{data} [{split}]"
    else:
        if data is None:
            files = [path for path, _ in foolbox_imagenet_samples()]
            source = "foolbox's ImageNet photos"
        else:
            files, source = iter_image_files([data]), str(data)
        files = files[:max_images] if max_images else files
        images = [Image.open(path) for path in files]
        labels = [_label_from_name(path) for path in files]
        ids = [path.stem for path in files]
    if not images:
        raise ValueError(f"no images found in {source}")
    processor = ImpureImageProcessor(crop_size=image_size)
    pixel_values = processor(images)["pixel_values"]
    label_tensor = torch.tensor(labels) if all(label is not None for label in labels) else None
    return EvalImages(pixel_values, label_tensor, ids, source)


def _dataset_images(data: str, split: str, max_images: Optional[int]):
    dataset = load_adversarial_dataset(data, split=split)
    first: dict = {}
    for row, source in enumerate(dataset["source_id"]):  # each clean image appears once per attack
        first.setdefault(source, row)
    sources = list(first)[:max_images] if max_images else list(first)
    subset = dataset.select([first[s] for s in sources])
    return list(subset["clean"]), list(subset["label"]), [str(s) for s in sources]


__all__ = ["EvalImages", "load_eval_images"]
