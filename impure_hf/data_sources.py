"""Where the adversarial dataset builder's images come from (``impure_hf.data``): the offline
photos and image folders (ImageNet's, or any folder labelled for the target classifier), as pools of
candidate images in a seeded order, and how a candidate's pixels are read."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from .classifiers import IMAGENET_LABELS, IMAGENET_SYNSETS
from .image_processing_impure import ImpureImageProcessor, to_pil_rgb
from .photos import OFFLINE_PHOTOS, foolbox_imagenet_samples, package_file

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


CROP_SCALE = (0.25, 1.0)  # area fraction of the random square crops of the offline photos


@dataclass(frozen=True)
class Candidate:
    source_id: str
    path: str
    label: Optional[int] = None  # None: use the classifier's clean prediction
    crop_seed: Optional[int] = None  # None: resize and centre-crop; else a seeded random crop


@dataclass(frozen=True)
class Pool:
    """Candidates in order; the first ``quota`` the classifier gets right are attacked."""

    candidates: tuple[Candidate, ...]
    quota: int


def derive_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def distinct_names(paths: Sequence[str]) -> list[str]:
    """Short provenance names of photo files: ``folder/file``, lengthened by parent folders until no
    two files share one (KDE wallpapers are all ``<Name>/contents/images/2560x1600.jpg``)."""
    parts = [Path(p).parts for p in paths]
    depth = [2] * len(parts)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clashing and depth[i] < len(parts[i])]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def offline_pools(split: str, size: int, seed: int, extra_train_photos: Sequence[str] = ()) -> list[Pool]:
    if split == "test":
        samples = foolbox_imagenet_samples()[:size]
        return [Pool((Candidate(f"foolbox/{path.name}", str(path), label),), 1) for path, label in samples]
    # (source id, file): packaged photos by package-relative name, extra photos by folder/name
    photos = [(name, str(package_file(name))) for name in OFFLINE_PHOTOS[split]]
    if split == "train":
        photos += list(zip(distinct_names(extra_train_photos), map(str, extra_train_photos)))
    pools = []
    for i in range(size):
        name, path = photos[i % len(photos)]
        crop_seed = derive_seed(seed, SPLITS.index(split), i)
        pools.append(Pool((Candidate(f"{name}#crop{i:05d}", path, None, crop_seed),), 1))
    return pools


def class_indices(folder_names: Sequence[str], names: Optional[Sequence[str]], num_classes: int) -> dict[str, int]:
    """Class index of each ImageFolder class folder for a classifier with class ``names``.

    With names: a folder is a class name (case and ``_``/space insensitive), a class index, or,
    for an ImageNet-1k classifier, a WordNet id (n01440764). Without names: the sorted folder
    names are classes 0, 1, ... (torchvision's ImageFolder order, how such a network was trained).
    """
    if names is None:
        if len(folder_names) > num_classes:
            raise ValueError(f"{len(folder_names)} class folders for a classifier with {num_classes} classes")
        return {name: i for i, name in enumerate(sorted(folder_names))}

    def key(text: str) -> str:
        return text.lower().replace("_", " ").strip()

    lookup = {key(name): i for i, name in enumerate(names)}
    if list(names) == IMAGENET_LABELS:
        lookup.update({wnid: i for i, wnid in enumerate(IMAGENET_SYNSETS)})
    found, unknown = {}, []
    for folder in folder_names:
        if folder in lookup or key(folder) in lookup:
            found[folder] = lookup.get(folder, lookup.get(key(folder)))
        elif folder.isdigit() and int(folder) < len(names):
            found[folder] = int(folder)
        else:
            unknown.append(folder)
    if unknown:
        imagenet = ", or ImageNet WordNet ids (n01440764, ...)" if list(names) == IMAGENET_LABELS else ""
        raise ValueError(
            f"class folder(s) {unknown[:5]} match none of the classifier's {len(names)} labels "
            f"({', '.join(names[:5])}, ...): name folders by the classifier's labels or class indices{imagenet}"
        )
    return found


def folder_layout(root: Path) -> dict[str, Optional[Path]]:
    """``ROOT/train`` and ``ROOT/val`` (or ``validation``) when there, else ``ROOT`` alone for training."""
    if (root / "train").is_dir():
        return {"train": root / "train", "val": next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)}
    return {"train": root, "val": None}


def class_files(folder: Path, label_names: Optional[Sequence[str]], num_classes: int) -> dict[Optional[int], list[Path]]:
    """Image files by class index: class folders named by the classifier's labels, or (None) the
    unlabelled images of ``folder`` itself, whose labels are the classifier's clean predictions."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")) if folder.is_dir() else []

    def images(path: Path) -> list[Path]:
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)

    if not classes:
        return {None: images(folder)} if folder.is_dir() and images(folder) else {}
    index = class_indices(classes, label_names, num_classes)
    return {index[name]: images(folder / name) for name in classes}


def folder_pools(settings: dict, split: str) -> list[Pool]:
    """One pool per class of an image folder (ImageNet's WordNet-id folders, or the classifier's own
    labels); the first ``sizes[split]`` correctly classified images of each, in a seeded order (all
    when the size is null). Validation and test take disjoint halves of ``val/``; without ``val/``,
    validation holds a seeded ``validation_fraction`` of each class of the training images."""
    root, seed, per_class = Path(settings["source"]), settings["seed"], settings["sizes"][split]
    label_names, num_classes = settings["label_names"], len(settings["label_names"])
    # a classifier without class names: folders in sorted order are its classes 0, 1, ...
    names = None if label_names == [str(i) for i in range(num_classes)] else label_names
    layout = folder_layout(root)
    folder = layout["train"] if split == "train" or layout["val"] is None else layout["val"]
    if split == "test" and layout["val"] is None:
        raise FileNotFoundError(f"the test split needs a val/ folder beside {root / 'train'}")
    groups = class_files(folder, names, num_classes)
    if not groups:
        raise FileNotFoundError(f"no class folders or images in {folder}: the {split} split needs {folder}/<class>/*.jpg")
    pools, total = [], 0
    for label, files in groups.items():
        # the unlabelled group takes the index no class has, so every group has its own seed
        order = num_classes if label is None else label
        if layout["val"] is None:  # one shuffled order per class, cut into validation and train
            random.Random(derive_seed(seed, 0, order)).shuffle(files)
            count = round(len(files) * settings["validation_fraction"]) if len(files) > 1 else 0
            files = files[:count] if split == "validation" else files[count:]
        else:
            random.Random(derive_seed(seed, int(split != "train"), order)).shuffle(files)
            if split != "train":  # validation and test: disjoint halves of the same shuffled val images
                files = files[0::2] if split == "validation" else files[1::2]
        total += len(files)
        candidates = tuple(Candidate(p.relative_to(root).as_posix(), str(p), label) for p in files)
        pools.append(Pool(candidates, per_class or len(candidates)))
    if total == 0:
        raise FileNotFoundError(f"no image files for the {split} split in {folder}")
    return pools


def folder_kind(root: Path) -> str:
    """``"imagenet"`` for ImageNet's layout (train/ of WordNet-id class folders), else ``"folder"``."""
    train = folder_layout(root)["train"]
    classes = [e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith(".")]
    synsets = set(IMAGENET_SYNSETS)
    return "imagenet" if train != root and classes and all(c in synsets for c in classes) else "folder"


def load_pixels(candidate: Candidate, image_size: int) -> Optional[torch.Tensor]:
    """(3, S, S) float image on the 8-bit grid, or None if the file cannot be decoded."""

    try:
        with Image.open(candidate.path) as image:
            image.load()
            pil = to_pil_rgb(image)
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        logger.warning("skipping %s: cannot decode (%s)", candidate.source_id, err)
        return None
    if candidate.crop_seed is None:
        return ImpureImageProcessor(crop_size=image_size)(pil)["pixel_values"][0]
    with torch.random.fork_rng(devices=[]):  # torchvision draws crop parameters from the global generator
        torch.manual_seed(candidate.crop_seed)
        top, left, height, width = RandomResizedCrop.get_params(pil, scale=list(CROP_SCALE), ratio=[1.0, 1.0])
        flip = bool(torch.rand(()) < 0.5)
    pil = TF.resized_crop(pil, top, left, height, width, [image_size, image_size], InterpolationMode.BICUBIC, antialias=True)
    if flip:
        pil = TF.hflip(pil)
    return TF.pil_to_tensor(pil).float() / 255


__all__ = [
    "SPLITS",
    "Candidate",
    "Pool",
    "class_indices",
    "derive_seed",
    "folder_kind",
    "folder_layout",
    "folder_pools",
    "load_pixels",
    "offline_pools",
]
