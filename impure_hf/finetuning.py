"""Fine-tuning a purifier for your own classifier, and a purified classifier in any transformers code.

The third way in: you have a classifier (timm, torchvision, a Hugging Face model, a plain
``nn.Module``; any label set) and want an IMPure purifier tuned for it.

    impure finetune --from impure-hf/impure-vit-b --classifier ./my-hf-classifier --data my_images/

1. Declare how the network reads images, once: ``ImageClassifier(model, input_size, mean, std,
   labels)`` (``impure_hf.classifiers``) takes [0, 1] images of any size, resizes and normalises.
2. Adversarial pairs for that classifier: [`build_finetuning_dataset`] (the packaged offline
   photos through ``impure_hf.data``'s builder, or an ImageFolder of your images) or
   [`adversarial_pairs`] (images in memory). The ``label`` column follows the classifier's labels.
3. ``impure_hf.finetune(purifier, classifier, pairs, **config)`` (``impure_hf.train.finetune``):
   the [train] trainer with the perceptual loss on the classifier's own layers, lr 1e-5, 10 epochs,
   optionally a frozen encoder.
4. Use it: ``PurifiedClassifier(purifier, classifier)`` (logits), or in a transformers pipeline
   through [`PurifiedImageClassification`] / [`purified_pipeline`].

LoRA / adapters (``peft``) are not offered: measured on these purifiers, ``freeze_encoder=True``
trains faster than LoRA on the decoder with less memory, and keeps the parameter names and the
``save_pretrained`` format (numbers: the README's fine-tuning section).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from ._utils import atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
SETTINGS_FILE = "pairs_settings.json"  # written with ImageFolder pairs: a rerun reuses them only if unchanged
SUMMARY_FILE = "finetune_summary.json"


# ---------------------------------------------------------------------------------- classifiers
def as_image_classifier(classifier: nn.Module, image_size: int) -> nn.Module:
    """``classifier`` itself if it is an ``ImageClassifier``; a plain module taking [0, 1] images
    is wrapped with identity normalisation at ``image_size`` (the builders need its label names)."""
    from .classifiers import ImageClassifier

    if isinstance(classifier, ImageClassifier):
        return classifier
    return ImageClassifier(classifier, image_size, mean=(0.0,) * 3, std=(1.0,) * 3, name=type(classifier).__name__)


def label_names(classifier: nn.Module, num_classes: int) -> list[str]:
    """The classifier's class names, or "0" .. "K-1" when it has none."""
    labels = getattr(classifier, "labels", None)
    return list(labels) if labels is not None else [str(i) for i in range(num_classes)]


# ---------------------------------------------------------------------------------- pairs in memory
def adversarial_pairs(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    attacks: Optional[Sequence[str]] = None,
    eps: float = 16 / 255,
    source_ids: Optional[Sequence[str]] = None,
    correct_only: bool = True,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
):
    """Attack ``images`` against ``classifier``: a ``datasets.Dataset`` with the columns of
    ``impure make-dataset`` (``impure_hf.data.COLUMNS``), its ``label`` in the classifier's labels.

    Args:
        classifier: module taking [0, 1] images (an ``ImageClassifier``; a plain module is wrapped
            by [`as_image_classifier`]), on the device to attack on.
        images: (N, 3, S, S) in [0, 1]; rounded to 8 bits first, as stored.
        labels: (N,) true class indices, or None: the classifier's clean predictions.
        attacks: names of ``impure_hf.attacks.ATTACKS`` (default: all nine).
        eps: L_inf budget in [0, 1] pixel units (the L2 attacks are unbounded).
        source_ids: one id per image (default: "image<i>").
        correct_only: attack only the images the classifier gets right (the paper's protocol).
        seed: seeds the attacks' random draws (per attack and batch).
        batch_size: images per attack call.
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    from .attacks import ATTACK_NORMS, ATTACKS, attack_images, attack_success, check_eps, make_attack, round_to_uint8
    from .classifiers import predict
    from .data import COLUMNS, adversarial_features
    from .image_processing_impure import ImpureImageProcessor
    from .train import check_classifier

    eps = check_eps(eps)
    attacks = [a.lower() for a in (attacks or ATTACKS)]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square RGB (N, 3, S, S) in [0, 1], got {tuple(images.shape)}")
    if labels is not None and labels.shape != images.shape[:1]:
        raise ValueError(f"expected {len(images)} labels, got shape {tuple(labels.shape)}")
    classifier = as_image_classifier(classifier, images.shape[-1])
    num_classes = check_classifier(classifier, images.shape[-1])
    names = label_names(classifier, num_classes)
    if labels is not None and len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) for this classifier, got {labels.min()} .. {labels.max()}")
    ids = list(source_ids) if source_ids is not None else [f"image{i}" for i in range(len(images))]
    if len(ids) != len(images):
        raise ValueError(f"expected {len(images)} source ids, got {len(ids)}")

    images = round_to_uint8(images.detach().float().cpu())
    predictions = predict(classifier, images)
    labels = predictions if labels is None else labels.cpu().long()
    keep = (predictions == labels) if correct_only else torch.ones(len(images), dtype=torch.bool)
    logger.info("%d of %d images are classified correctly%s", int((predictions == labels).sum()), len(images),
                "; only those are attacked" if correct_only else "")
    images, labels = images[keep], labels[keep]
    ids = [i for i, k in zip(ids, keep.tolist()) if k]

    device = next(classifier.parameters()).device
    rows: dict[str, list] = {column: [] for column in COLUMNS}
    made = [make_attack(name, classifier, eps=eps) for name in attacks]
    steps = [(a, b) for a in range(len(attacks)) for b in range(0, len(images), batch_size)]
    success: dict[str, int] = dict.fromkeys(attacks, 0)
    for a, b in tqdm(steps, desc="attacking", unit="batch", disable=not progress):
        name, attack = attacks[a], made[a]
        clean, target = images[b : b + batch_size], labels[b : b + batch_size]
        batch_seed = int(np.random.SeedSequence([seed, a, b]).generate_state(1)[0])
        adversarial = attack_images(attack, clean.to(device), target.to(device), seed=batch_seed).cpu()
        bound = eps if ATTACK_NORMS[name] == "Linf" else None
        adversarial = round_to_uint8(adversarial, clean, bound)  # what a stored PNG keeps
        success[name] += int(attack_success(classifier, adversarial, target).sum())
        rows["clean"] += ImpureImageProcessor.post_process(clean)
        rows["adversarial"] += ImpureImageProcessor.post_process(adversarial)
        rows["label"] += target.tolist()
        rows["attack"] += [name] * len(clean)
        rows["classifier"] += [getattr(classifier, "name", type(classifier).__name__)] * len(clean)
        rows["eps"] += [bound] * len(clean)
        rows["source_id"] += ids[b : b + batch_size]
    for name, count in success.items():
        logger.info("%s fools the classifier on %d of %d images (8-bit)", name, count, len(images))
    return Dataset.from_dict(rows, features=adversarial_features(names))


# ---------------------------------------------------------------------------------- image folders
@dataclass
class FolderImages:
    """Images of one split of an image folder: (N, 3, S, S) in [0, 1], labels (N,) or None, ids."""

    pixel_values: torch.Tensor
    labels: Optional[torch.Tensor]
    ids: list[str]


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


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
    from .classifiers import IMAGENET_LABELS, IMAGENET_SYNSETS

    def key(text: str) -> str:
        return text.lower().replace("_", " ").strip()

    lookup = {key(name): i for i, name in enumerate(names)}
    if list(names) == IMAGENET_LABELS:
        lookup.update({wnid: i for i, wnid in enumerate(IMAGENET_SYNSETS)})
    found, unknown = {}, []
    for folder in folder_names:
        if key(folder) in lookup:
            found[folder] = lookup[key(folder)]
        elif folder.isdigit() and int(folder) < len(names):
            found[folder] = int(folder)
        else:
            unknown.append(folder)
    if unknown:
        raise ValueError(
            f"class folder(s) {unknown[:5]} match none of the classifier's {len(names)} labels "
            f"({', '.join(names[:5])}, ...): name folders by the classifier's labels or class indices"
        )
    return found


def _read_images(files: Sequence[Path], image_size: int) -> tuple[list[torch.Tensor], list[int]]:
    """Decoded (3, S, S) images (shortest edge resized to S, centre crop) and the positions read."""
    from PIL import Image

    from .image_processing_impure import ImpureImageProcessor

    processor = ImpureImageProcessor(crop_size=image_size, resize_shortest_edge=image_size)
    images, kept = [], []
    for position, path in enumerate(files):
        try:
            with Image.open(path) as image:
                image.load()
                images.append(processor(image)["pixel_values"][0])
            kept.append(position)
        except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            logger.warning("skipping %s: cannot decode (%s)", path, err)
    return images, kept


def load_image_folder(
    root: PathLike,
    classifier: nn.Module,
    image_size: int,
    num_classes: Optional[int] = None,
    train_size: Optional[int] = None,
    validation_size: Optional[int] = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, FolderImages]:
    """The ``train`` and ``validation`` images of a folder, labelled for ``classifier``.

    Layouts: ``ROOT/train/`` and ``ROOT/val/`` (or ``validation/``), or ``ROOT`` alone, whose
    images are split per class by a seeded ``validation_fraction``. Each of them holds class
    folders (``<class>/*.jpg``, see [`class_indices`]) or just images (unlabelled: the
    classifier's clean predictions serve as labels). ``train_size`` / ``validation_size`` keep
    the first images of each class (of the whole split when unlabelled) in a seeded order.
    """
    from .data import iter_image_files

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {validation_fraction}")
    if num_classes is None:
        from .train import check_classifier

        num_classes = check_classifier(classifier, image_size)
    names = getattr(classifier, "labels", None)
    validation = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
    folders = {"train": root / "train", "validation": validation} if (root / "train").is_dir() else {"train": root}

    def groups(folder: Path) -> dict[Optional[int], list[Path]]:
        """Files by class index (None: unlabelled), each group in a seeded order."""
        classes = _class_folders(folder)
        if classes:
            index = class_indices([c.name for c in classes], names, num_classes)
            found = {index[c.name]: iter_image_files([c]) for c in classes}
        else:
            found = {None: iter_image_files([folder])}
        for label, files in found.items():
            random.Random(f"{seed}-{label}").shuffle(files)
        return found

    splits: dict[str, dict[Optional[int], list[Path]]] = {name: groups(f) for name, f in folders.items() if f is not None}
    if "validation" not in splits and validation_fraction > 0:
        splits["validation"] = {}
        for label, files in splits["train"].items():
            count = round(len(files) * validation_fraction) if len(files) > 1 else 0
            splits["validation"][label], splits["train"][label] = files[:count], files[count:]

    limits = {"train": train_size, "validation": validation_size}
    result = {}
    for split, by_class in splits.items():
        files, labels = [], []
        for label, group in sorted(by_class.items(), key=lambda item: -1 if item[0] is None else item[0]):
            group = group[: limits[split]] if limits[split] else group
            files += group
            labels += [label] * len(group)
        images, kept = _read_images(files, image_size)
        if not images:
            logger.warning("no decodable images for the %s split in %s", split, folders.get(split, root))
            continue
        labelled = bool(labels) and labels[0] is not None
        result[split] = FolderImages(
            torch.stack(images),
            torch.tensor([labels[i] for i in kept]) if labelled else None,
            [files[i].relative_to(root).as_posix() for i in kept],
        )
    if "train" not in result:
        raise FileNotFoundError(f"no decodable training images in {root}")
    return result


# ---------------------------------------------------------------------------------- the builder
def _write_pairs(out: Path, pairs, settings: dict) -> None:
    """Parquet shards and a card in the layout of ``impure make-dataset`` (``load_adversarial_dataset`` reads it)."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    lines = ["# IMPure adversarial pairs for fine-tuning", "", "Built by `impure_hf.finetuning.build_finetuning_dataset`.", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    lines += ["", "| split | rows |", "|---|---|"]
    for split, data in pairs.items():
        data.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
        lines.append(f"| {split} | {len(data)} |")
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
    atomic_write_json(out / SETTINGS_FILE, settings, indent=1)  # last: marks a finished build


def build_finetuning_dataset(
    classifier: nn.Module,
    source: PathLike = "offline",
    output_dir: Optional[PathLike] = None,
    image_size: int = 224,
    attacks: Optional[Sequence[str]] = None,
    eps: float = 16 / 255,
    train_size: Optional[int] = None,
    validation_size: Optional[int] = None,
    validation_fraction: float = 0.2,
    correct_only: bool = True,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
):
    """Adversarial ``train`` / ``validation`` pairs for ``classifier`` as a ``DatasetDict``.

    Args:
        classifier: the target (an ``ImageClassifier``, or a module taking [0, 1] images); any
            number of classes. The ``label`` column uses its class names.
        source: ``"offline"``: the packaged real photos through ``impure_hf.data``'s builder
            (random crops, labelled by the classifier's clean predictions; ``output_dir``
            required, resumable); or an image folder (see [`load_image_folder`]).
        output_dir: where to keep the pairs (a folder ``load_adversarial_dataset`` and
            ``impure finetune --data`` read); a rerun with the same settings reuses it.
        image_size: side of the pairs: the purifier's ``config.image_size``.
        attacks / eps / seed / batch_size: as [`adversarial_pairs`] (default: all nine attacks).
        train_size / validation_size: offline: number of photo crops (default 64 / 16); image
            folder: images per class (default: all).
        validation_fraction: image folder without ``val/``: share of each class held out.
        correct_only: attack only correctly classified images (the offline builder always does).
    """
    from datasets import DatasetDict

    from .data import build_adversarial_dataset, load_adversarial_dataset
    from .train import check_classifier

    classifier = as_image_classifier(classifier, image_size)
    num_classes = check_classifier(classifier, image_size)
    if str(source) == "offline":
        if output_dir is None:
            raise ValueError("the offline source writes its pairs to disk: pass output_dir")
        folder = build_adversarial_dataset(
            output_dir, classifiers=classifier, attacks=attacks, eps=eps, source="offline",
            splits=("train", "validation"), train_size=train_size, validation_size=validation_size,
            image_size=image_size, seed=seed, batch_size=batch_size,
            device=next(classifier.parameters()).device, progress=progress,
        )
        return load_adversarial_dataset(folder)

    settings = {
        "classifier": classifier.name, "source": str(Path(source).resolve()), "image_size": image_size,
        "attacks": list(attacks) if attacks else "all", "eps": eps, "train_size": train_size,
        "validation_size": validation_size, "validation_fraction": validation_fraction,
        "correct_only": correct_only, "seed": seed, "labels": label_names(classifier, num_classes),
    }
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and (out / SETTINGS_FILE).is_file():
        if read_json(out / SETTINGS_FILE, hint="delete the folder to build the pairs again") == settings:
            return load_adversarial_dataset(out)
        raise FileExistsError(f"{out} holds pairs built with other settings; choose another folder or delete it")
    if out is not None and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose an empty or new folder for the pairs")

    splits = load_image_folder(source, classifier, image_size, num_classes, train_size, validation_size, validation_fraction, seed)
    pairs = {}
    for index, (split, found) in enumerate(splits.items()):
        split_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        pairs[split] = adversarial_pairs(
            classifier, found.pixel_values, found.labels, attacks, eps, found.ids, correct_only, split_seed, batch_size, progress
        )
    empty = [split for split, data in pairs.items() if len(data) == 0]
    if "train" in empty:
        raise ValueError(f"no training pairs: the classifier classifies none of the training images in {source} correctly")
    pairs = DatasetDict({split: data for split, data in pairs.items() if split not in empty})
    if out is not None:
        _write_pairs(out, pairs, settings)
    return pairs


# ---------------------------------------------------------------------------------- transformers
class PurifiedImageClassificationConfig(PretrainedConfig):
    """Configuration of [`PurifiedImageClassification`]: the class names (``id2label``), the
    purifier's image size and the number of purifications averaged per prediction."""

    model_type = "impure-purified-image-classification"

    def __init__(self, image_size: int = 224, num_samples: int = 1, **kwargs):
        self.image_size = image_size
        self.num_samples = num_samples
        super().__init__(**kwargs)

    @classmethod
    def for_modules(cls, purifier: nn.Module, classifier: nn.Module, num_samples: int = 1) -> "PurifiedImageClassificationConfig":
        """Image size from the purifier; class names from ``classifier.labels`` (else ``LABEL_<i>``)."""
        from .train import check_classifier

        image_size = purifier.config.image_size
        num_classes = check_classifier(classifier, image_size)
        labels = getattr(classifier, "labels", None)
        id2label = dict(enumerate(labels)) if labels is not None else None
        return cls(image_size=image_size, num_samples=num_samples, num_labels=num_classes, id2label=id2label)


class PurifiedImageClassification(PreTrainedModel):
    """A purifier in front of a classifier as a transformers image-classification model.

    ``forward(pixel_values)`` takes [0, 1] images (``ImpureImageProcessor`` output) and returns
    an ``ImageClassifierOutput`` (logits, and the cross-entropy loss when ``labels`` are given),
    so it runs in ``transformers.pipeline("image-classification", model=..., image_processor=...)``
    (see [`purified_pipeline`]), in ``Trainer.evaluate`` and in code written for
    ``AutoModelForImageClassification`` outputs. It wraps live modules: save the purifier with
    ``save_pretrained`` and your classifier its own way, and rebuild this wrapper from them.

    Args:
        config: a [`PurifiedImageClassificationConfig`]; default: built from the modules
            (class names from ``classifier.labels``, else ``LABEL_<i>``).
        purifier: an ``ImpureModel`` (or a baseline purifier).
        classifier: module taking [0, 1] images and returning logits (e.g. ``ImageClassifier``).
        generator: default source of the purifier's noise (fixed generator: reproducible output).

    Example:

    ```python
    >>> wrapped = PurifiedImageClassification(purifier=purifier, classifier=classifier)
    >>> wrapped(pixel_values).logits.argmax(-1)
    ```
    """

    config_class = PurifiedImageClassificationConfig
    main_input_name = "pixel_values"

    def __init__(
        self,
        config: Optional[PurifiedImageClassificationConfig] = None,
        purifier: Optional[nn.Module] = None,
        classifier: Optional[nn.Module] = None,
        generator: Optional[torch.Generator] = None,
    ):
        if purifier is None or classifier is None:
            raise ValueError("PurifiedImageClassification wraps live modules: pass purifier= and classifier=")
        from .evaluate import PurifiedClassifier
        from .train import check_classifier

        if config is None:
            config = PurifiedImageClassificationConfig.for_modules(purifier, classifier)
        elif config.num_labels != (num_classes := check_classifier(classifier, config.image_size)):
            raise ValueError(f"config.num_labels is {config.num_labels} but the classifier has {num_classes} classes")
        super().__init__(config)
        self.defended = PurifiedClassifier(purifier, classifier, num_samples=config.num_samples, generator=generator)
        self.post_init()
        self.training = self.defended.training  # as the wrapped modules are; their modes are left alone

    def _init_weights(self, module: nn.Module) -> None:
        pass  # the wrapped modules arrive trained: nothing to initialise

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[ImageClassifierOutput, tuple]:
        logits = self.defended(pixel_values, generator=generator)
        loss = nn.functional.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return ImageClassifierOutput(loss=loss, logits=logits)


class _DropUnsupportedModelMessage(logging.Filter):
    """The pipeline logs an error for any model class outside transformers' built-in list, though
    it runs every model whose output has ``logits`` and whose config has ``id2label``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"'{PurifiedImageClassification.__name__}' is not supported" not in record.getMessage()


def purified_pipeline(
    purifier: nn.Module,
    classifier: nn.Module,
    num_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    image_processor=None,
    **pipeline_kwargs,
):
    """``transformers.pipeline("image-classification")`` that purifies before classifying.

    Args:
        purifier: an ``ImpureModel``.
        classifier: module taking [0, 1] images (e.g. ``ImageClassifier``) with ``labels``.
        num_samples: purifications averaged per prediction.
        generator: source of the purifier's noise (reproducible scores).
        image_processor: default ``ImpureImageProcessor`` at the purifier's size.
        **pipeline_kwargs: ``device``, ``top_k``, ... for ``transformers.pipeline``.

    The same without this function (the pipeline then also logs that the class is not one of
    its built-in models, harmlessly)::

        model = PurifiedImageClassification(purifier=purifier, classifier=classifier)
        pipe = pipeline("image-classification", model=model, image_processor=ImpureImageProcessor(crop_size=size))
    """
    from transformers import pipeline

    from .image_processing_impure import ImpureImageProcessor

    config = PurifiedImageClassificationConfig.for_modules(purifier, classifier, num_samples)
    model = PurifiedImageClassification(config, purifier=purifier, classifier=classifier, generator=generator)
    if image_processor is None:
        size = purifier.config.image_size
        image_processor = ImpureImageProcessor(crop_size=size, resize_shortest_edge=size)
    base_logger = logging.getLogger("transformers.pipelines.base")
    quiet = _DropUnsupportedModelMessage()
    base_logger.addFilter(quiet)
    try:
        return pipeline("image-classification", model=model, image_processor=image_processor, **pipeline_kwargs)
    finally:
        base_logger.removeFilter(quiet)


# ---------------------------------------------------------------------------------- command line
def parse_labels(text: Optional[str]) -> Optional[list[str]]:
    """``--labels``: a text file (one name a line) or names separated by commas."""
    if text is None:
        return None
    path = Path(text)
    names = path.read_text().splitlines() if path.is_file() else text.split(",")
    return [n.strip() for n in names if n.strip()]


def load_custom_classifier(
    name: str,
    weights: Optional[PathLike] = None,
    num_classes: Optional[int] = None,
    labels: Optional[Sequence[str]] = None,
    input_size: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> nn.Module:
    """A frozen ``ImageClassifier`` with any label set, by name.

    ``classifiers.load_classifier`` for its names (a transformers folder brings its own labels);
    a timm architecture with its own head when ``num_classes`` (or ``labels``) is not 1000, from
    ``weights``. ``input_size`` / ``mean`` / ``std`` declare what the network expects when its
    defaults are not it; ``labels`` names the classes.
    """
    import timm

    from .classifiers import ImageClassifier, load_classifier, read_state_dict

    labels = list(labels) if labels is not None else None
    if labels is not None and len(set(labels)) != len(labels):
        raise ValueError(f"class names must be distinct, got {labels}")
    num_classes = num_classes or (len(labels) if labels else None)
    if labels is not None and num_classes != len(labels):
        raise ValueError(f"num_classes is {num_classes} but {len(labels)} labels are given")
    if num_classes is not None and num_classes != 1000 and timm.is_model(name):
        if weights is None:
            raise ValueError(f"a {num_classes}-class head on {name!r} needs its trained weights (weights= / --classifier-weights)")
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        try:
            model.load_state_dict(read_state_dict(weights))
        except RuntimeError as err:
            raise ValueError(f"{weights} does not fit {name} with {num_classes} classes:\n{err}") from None
        data = timm.data.resolve_model_data_config(model)
        base = ImageClassifier(model, int(data["input_size"][-1]), data["mean"], data["std"], labels, name=name)
    else:
        base = load_classifier(name, weights=weights)
    classifier = ImageClassifier(
        base.model,
        input_size or base.input_size,
        mean or base.mean.flatten().tolist(),
        std or base.std.flatten().tolist(),
        labels or base.labels,
        name=base.name,
    )
    return classifier.requires_grad_(False).eval()


def _is_pair_dataset(data: str) -> bool:
    """A folder of ``impure make-dataset`` / this builder, or (not a local path) a Hub dataset id."""
    path = Path(data)
    if not path.exists():
        return "/" in data and not data.startswith((".", "/"))
    return path.is_dir() and (path / "README.md").is_file() and any((path / "data").glob("*.parquet"))


def _options(args: argparse.Namespace) -> dict:
    """Training options: the ``--config`` YAML file, then the flags given."""
    from .train import TrainingConfig

    names = {f for f in TrainingConfig.__dataclass_fields__}
    values = {}
    if getattr(args, "config", None):
        import yaml

        values = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{args.config} must hold a mapping of training options")
    values.update({k: v for k, v in vars(args).items() if k in names})
    return values


def _prepare(args: argparse.Namespace):
    """Options, purifier, classifier and pairs of ``impure finetune``; bad input raises here."""
    from .hub import load_purifier
    from .train import FINETUNE_DEFAULTS, TrainingConfig, check_classifier

    options = _options(args)
    purifier_name, classifier_name = options.pop("model", None), options.pop("classifier", None)
    data = str(args.data or options.pop("dataset", None) or "offline")
    if not classifier_name:
        raise ValueError("--classifier is required (efficientnet_lite0, a timm name, or a transformers folder / Hub id)")
    config = TrainingConfig.from_dict({**FINETUNE_DEFAULTS, **options})  # checks every option first
    purifier = load_purifier(purifier_name)
    size = purifier.config.image_size
    classifier = load_custom_classifier(
        classifier_name, args.classifier_weights, args.num_classes, parse_labels(args.labels), args.input_size, args.mean, args.std
    )
    check_classifier(classifier, size)
    if _is_pair_dataset(data):
        from .data import load_adversarial_dataset

        pairs = load_adversarial_dataset(data)
    else:
        pairs = build_finetuning_dataset(
            classifier, data, args.pairs_dir or Path(config.output_dir) / "pairs", size,
            None if args.attacks == ["all"] else args.attacks, args.eps, args.train_size, args.validation_size,
            args.validation_fraction, seed=config.seed, batch_size=args.pair_batch_size,
        )
    summary = {"purifier": purifier_name or "embedded default", "classifier": classifier.name, "data": data}
    return options, config, purifier, classifier, pairs, summary


def _run(args: argparse.Namespace) -> int:
    from .train import finetune, validation_metrics

    try:
        options, config, purifier, classifier, pairs, summary = _prepare(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"impure finetune: {err}", file=sys.stderr)
        return 2
    held_out = pairs.get(config.eval_split) if config.eval_split else None
    before = validation_metrics(purifier, held_out, classifier) if held_out is not None else None
    tuned = finetune(purifier, classifier, pairs, **options)
    if held_out is not None:
        after = validation_metrics(tuned, held_out, classifier)
        summary.update(validation_split=config.eval_split, images=len(held_out), before=before, after=after)
        print(
            f"purified adversarial top-1 on {len(held_out)} {config.eval_split} pairs: "
            f"{100 * before['top1']:.1f}% before, {100 * after['top1']:.1f}% after fine-tuning "
            f"(PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB)"
        )
    output_dir = Path(config.output_dir)
    atomic_write_json(output_dir / SUMMARY_FILE, summary, indent=1)
    print(f"fine-tuned purifier saved to {output_dir}")
    return 0


def add_parser(subparsers) -> None:
    """Register ``impure finetune``."""
    from .data import parse_eps
    from .train import FINETUNE_DEFAULTS, _add_arguments

    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a purifier for your classifier (any label set)",
        description="Fine-tune an IMPure purifier for a target classifier: build adversarial pairs for it (unless "
        "--data holds them) and train with the perceptual loss on its own layers. Takes every `impure train` "
        f"option; fine-tuning defaults: {FINETUNE_DEFAULTS}.",
        conflict_handler="resolve",  # the options below replace `impure train`'s --model / --classifier / --dataset
    )
    _add_arguments(parser)
    parser.add_argument("--from", "--model", dest="model", default=argparse.SUPPRESS,
                        help="purifier to start from: preset name, saved folder or Hub id (default: the embedded model)")
    parser.add_argument("--classifier", default=argparse.SUPPRESS,
                        help="target: efficientnet_lite0, a timm name, or a transformers image-classification folder / Hub id")
    parser.add_argument("--classifier-weights", default=None, help="weights file (.safetensors, or a torch state dict) for a timm architecture")
    parser.add_argument("--num-classes", type=int, default=None, help="classes of the timm architecture's own head (needs --classifier-weights)")
    parser.add_argument("--labels", default=None, help="class names: a text file (one a line) or comma-separated")
    parser.add_argument("--input-size", type=int, default=None, help="input side the network expects (default: its own)")
    parser.add_argument("--mean", type=float, nargs=3, default=None, help="per-channel mean the network was trained with")
    parser.add_argument("--std", type=float, nargs=3, default=None, help="per-channel std the network was trained with")
    parser.add_argument("--data", "--dataset", dest="data", default=None,
                        help="pairs (an `impure make-dataset` folder or Hub id), an image folder (ROOT/<class>/*, or "
                        "ROOT/train and ROOT/val) to build pairs from, or 'offline' (packaged photos; default)")
    parser.add_argument("--pairs-dir", default=None, help="where built pairs are kept (default: OUTPUT_DIR/pairs)")
    parser.add_argument("--attacks", nargs="+", default=["all"], help="attacks of the built pairs (default: all nine)")
    parser.add_argument("--eps", type=parse_eps, default=16 / 255, help="L_inf budget of the built pairs (default 16/255)")
    parser.add_argument("--train-size", type=int, default=None, help="offline: photo crops (64); image folder: images per class (all)")
    parser.add_argument("--validation-size", type=int, default=None, help="offline: photo crops (16); image folder: images per class (all)")
    parser.add_argument("--validation-fraction", type=float, default=0.2, help="image folder without val/: share of each class held out")
    parser.add_argument("--pair-batch-size", type=int, default=16, help="images per attack call while building pairs")
    parser.set_defaults(func=_run)


__all__ = [
    "FolderImages",
    "PurifiedImageClassification",
    "PurifiedImageClassificationConfig",
    "adversarial_pairs",
    "as_image_classifier",
    "build_finetuning_dataset",
    "class_indices",
    "label_names",
    "load_custom_classifier",
    "load_image_folder",
    "parse_labels",
    "purified_pipeline",
]
