"""Fine-tuning a purifier for your own classifier, and a purified classifier in any transformers code.

The third way in: you have a classifier (timm, torchvision, a Hugging Face model, a plain
``nn.Module``; any label set) and want an IMPure purifier tuned for it.

    impure finetune --from impure-hf/impure-vit-b --classifier ./my-hf-classifier --data my_images/

1. Declare how the network reads images, once: ``ImageClassifier(model, input_size, mean, std,
   labels)`` (``impure_hf.classifiers``) takes [0, 1] images of any size, resizes and normalises.
2. Adversarial pairs for that classifier, built by the one dataset builder
   (``impure_hf.data.build_adversarial_dataset``, here through [`build_finetuning_dataset`]): the
   packaged offline photos, or an image folder of your images labelled with the classifier's own
   class names. The ``label`` column follows the classifier's labels.
3. ``impure_hf.finetune(purifier, classifier, pairs, **config)`` ([`finetune`]): the trainer of
   ``impure_hf.train`` with the perceptual loss on the classifier's own layers, lr 1e-5, 10
   epochs, optionally a frozen encoder.
4. Use it: ``PurifiedClassifier(purifier, classifier)`` (logits), or in a transformers pipeline
   through ``PurifiedImageClassification`` / ``purified_pipeline`` (``impure_hf.defended``).

LoRA / adapters (``peft``) are not offered: measured on these purifiers, ``freeze_encoder=True``
trains faster than LoRA on the decoder with less memory, and keeps the parameter names and the
``save_pretrained`` format (numbers: the README's fine-tuning section).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import timm
import yaml
from datasets import DatasetDict
from torch import nn

from ._utils import atomic_write_json, parse_eps
from .classifiers import ImageClassifier, check_classifier, load_classifier, read_state_dict
from .data import build_adversarial_dataset, class_indices, load_adversarial_dataset  # noqa: F401  (class_indices: its old home)
from .defended import (  # noqa: F401  (their old home was here)
    PurifiedImageClassification,
    PurifiedImageClassificationConfig,
    purified_pipeline,
)
from .loading import load_purifier
from .modeling_impure import ImpureModel
from .train import TrainingConfig, train, validation_metrics
from .train import add_arguments as add_training_arguments

PathLike = Union[str, Path]
SUMMARY_FILE = "finetune_summary.json"


# ---------------------------------------------------------------------------------- fine-tuning
# Fine-tuning defaults (the release fine-tunes with a lower rate for fewer epochs); any
# TrainingConfig field given to `finetune` overrides them.
FINETUNE_DEFAULTS = dict(
    perceptual_loss="classifier",
    learning_rate=1e-5,
    num_epochs=10,
    warmup_epochs=1.0,
    output_dir="outputs/impure-finetune",
)


def _check_label_set(dataset, classifier: nn.Module, num_classes: int) -> None:
    """Labels of a ``datasets`` ClassLabel column must be the classifier's (same names, same order)."""
    features = getattr(dataset, "features", None)
    if features is None and isinstance(dataset, dict):  # a DatasetDict: every split has the same features
        features = next(iter(dataset.values())).features
    names = getattr((features or {}).get("label"), "names", None)
    if names is None:
        return
    expected = getattr(classifier, "labels", None)
    if expected is not None and list(names) != list(expected):
        raise ValueError(
            f"the dataset's labels ({len(names)} classes: {', '.join(names[:4])}, ...) are not the classifier's "
            f"({len(expected)} classes: {', '.join(expected[:4])}, ...): build the pairs for this classifier "
            "(impure_hf.finetuning.build_finetuning_dataset or `impure finetune` without --data)"
        )
    if len(names) != num_classes:
        raise ValueError(f"the dataset has {len(names)} label classes but the classifier {num_classes} outputs")


def finetune(
    purifier: Union[ImpureModel, str],
    classifier: Union[nn.Module, str],
    dataset,
    eval_dataset=None,
    **config,
) -> ImpureModel:
    """Fine-tune a trained purifier for one target classifier (the paper's flexible perceptual loss).

    Same trainer as [`train`], with fine-tuning defaults ([`FINETUNE_DEFAULTS`]): perceptual loss
    on the classifier's own layers, lr 1e-5, 10 epochs, 1 warm-up epoch. Any [`TrainingConfig`]
    field can be overridden (e.g. ``freeze_encoder=True``, ``perceptual_layers={...}``,
    ``perceptual_loss="vgg19"``).

    Args:
        purifier: an ``ImpureModel`` or a preset name / folder / Hub id (``hub.load_purifier``).
        classifier: the target: a module taking (N, 3, H, W) images in [0, 1] and returning
            logits, e.g. ``ImageClassifier(model, input_size, mean, std, labels)`` for a network
            that expects normalised input, or a name for ``classifiers.load_classifier``. Its
            label set can be any (not only ImageNet). It is checked once on a batch of the
            purifier's size; a mismatch raises a ValueError before training.
        dataset: adversarial pairs (``clean``, ``adversarial``, optionally ``label`` that must
            follow the classifier's labels): a ``datasets`` Dataset, a DatasetDict split by
            ``train_split`` / ``eval_split``, a dataset folder / Hub id, or None for the
            ``dataset`` option. Build them with ``impure_hf.finetuning.build_finetuning_dataset``.
        eval_dataset: validation pairs (default: the DatasetDict's ``eval_split``).
    """
    if isinstance(purifier, str):
        purifier = load_purifier(purifier)
    if isinstance(classifier, str):
        classifier = load_classifier(classifier)
    num_classes = check_classifier(classifier, purifier.config.image_size)
    settings = TrainingConfig.from_dict({**FINETUNE_DEFAULTS, **config})
    if isinstance(dataset, (str, Path)):
        settings.dataset, dataset = str(dataset), None
    if dataset is None and settings.dataset is not None:
        dataset = load_adversarial_dataset(settings.dataset, streaming=settings.streaming)
    for data in (dataset, eval_dataset):
        if data is not None:
            _check_label_set(data, classifier, num_classes)
    return train(settings, purifier, dataset, eval_dataset, classifier)


# ---------------------------------------------------------------------------------- pairs
def as_image_classifier(classifier: nn.Module, image_size: int) -> nn.Module:
    """``classifier`` itself if it is an ``ImageClassifier``; a plain module taking [0, 1] images
    is wrapped with identity normalisation at ``image_size`` (the builders need its label names)."""
    if isinstance(classifier, ImageClassifier):
        return classifier
    return ImageClassifier(classifier, image_size, mean=(0.0,) * 3, std=(1.0,) * 3, name=type(classifier).__name__)


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
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> DatasetDict:
    """Adversarial ``train`` / ``validation`` pairs for ``classifier``, built by the one dataset
    builder (``impure_hf.data.build_adversarial_dataset``) into ``output_dir``; a rerun with the
    same settings resumes or reuses the build, one with other settings raises a ValueError.

    Args:
        classifier: the target (an ``ImageClassifier``, or a module taking [0, 1] images); any
            number of classes. The ``label`` column uses its class names.
        source: ``"offline"`` (random crops of the packaged real photos, labelled by the
            classifier's clean predictions) or an image folder (``ROOT/train`` + ``ROOT/val``, or
            ``ROOT`` alone) of class folders named by the classifier's labels or indices, or of bare
            images (see ``impure_hf.data``).
        output_dir: where the pairs are written (a folder ``load_adversarial_dataset`` and
            ``impure finetune --data`` read).
        image_size: side of the pairs: the purifier's ``config.image_size``.
        train_size / validation_size: offline: number of photo crops (default 64 / 16); image
            folder: images per class (default: all).
        validation_fraction: image folder without ``val/``: share of each class held out.
        attacks / eps / seed / batch_size: as ``build_adversarial_dataset`` (default: all nine attacks).
    """
    if output_dir is None:
        raise ValueError("the pairs are written to disk (resumable): pass output_dir")
    classifier = as_image_classifier(classifier, image_size)
    check_classifier(classifier, image_size)
    folder = build_adversarial_dataset(
        output_dir, classifiers=classifier, attacks=attacks, eps=eps, source=source, splits=("train", "validation"),
        train_size=train_size, validation_size=validation_size, validation_fraction=validation_fraction,
        image_size=image_size, seed=seed, batch_size=batch_size, device=next(classifier.parameters()).device,
        progress=progress,
    )
    pairs = load_adversarial_dataset(folder)
    if len(pairs.get("train", [])) == 0:
        raise ValueError(f"no training pairs: the classifier classifies none of the training images in {source} correctly")
    return pairs


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
    names = {f for f in TrainingConfig.__dataclass_fields__}
    values = {}
    if getattr(args, "config", None):
        values = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{args.config} must hold a mapping of training options")
    values.update({k: v for k, v in vars(args).items() if k in names})
    return values


def _prepare(args: argparse.Namespace):
    """Options, purifier, classifier and pairs of ``impure finetune``; bad input raises here."""
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
        pairs = load_adversarial_dataset(data)
    else:
        pairs = build_finetuning_dataset(
            classifier, data, args.pairs_dir or Path(config.output_dir) / "pairs", size,
            None if args.attacks == ["all"] else args.attacks, args.eps, args.train_size, args.validation_size,
            args.validation_fraction, seed=config.seed, batch_size=args.pair_batch_size,
        )
    summary = {"purifier": purifier_name or "embedded default", "classifier": classifier.name, "data": data}
    return options, config, purifier, classifier, pairs, summary


def run(args: argparse.Namespace) -> int:
    """``impure finetune``."""
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``impure finetune``: every ``impure train`` option, with --model / --classifier /
    --dataset replaced (the parser needs ``conflict_handler="resolve"``)."""
    add_training_arguments(parser)
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


__all__ = [
    "FINETUNE_DEFAULTS",
    "add_arguments",
    "as_image_classifier",
    "build_finetuning_dataset",
    "class_indices",
    "finetune",
    "load_custom_classifier",
    "parse_labels",
    "run",
]
