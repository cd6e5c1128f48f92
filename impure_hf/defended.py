"""A classifier behind a purifier: the defended model every evaluation, attack and pipeline uses.

- ``PurifiedClassifier``: [0, 1] images in, logits out, differentiable end to end, averaging the
  logits of several purifications of a stochastic purifier.
- ``PurifiedImageClassification`` / ``purified_pipeline``: the same as a transformers
  image-classification model and pipeline.
- ``amplified_perturbation``, ``purified_pixel_values``, ``is_stochastic``: small helpers of the
  evaluation and the demo page.
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, pipeline
from transformers.modeling_outputs import ImageClassifierOutput

from .classifiers import check_classifier
from .image_processing_impure import ImpureImageProcessor


def amplified_perturbation(clean: torch.Tensor, adversarial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) perturbations, each scaled around grey 0.5 until its largest entry reaches 0 or 1
    (as the panels and the demo page show them), and the (N,) factors they were scaled by."""
    delta = adversarial - clean
    factor = 0.5 / delta.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return (0.5 + factor * delta).clamp(0, 1), factor.flatten()



def purified_pixel_values(
    purifier: nn.Module, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Run any purifier (``ImpureModel`` or a baseline) with gradients; [0, 1] images out."""
    output = purifier(pixel_values, generator=generator)
    return getattr(output, "purified_pixel_values", output)



def is_stochastic(purifier: nn.Module) -> bool:
    """Whether two calls on the same input can differ (so EOT and repeated evaluation matter)."""
    config = getattr(purifier, "config", None)
    if config is not None and hasattr(config, "uses_noise"):
        # IMPure draws fresh noise at evaluation too; in training mode also the division and window
        return bool(config.uses_noise or purifier.training)
    return bool(getattr(purifier, "stochastic", False))



class PurifiedClassifier(nn.Module):
    """A classifier behind a purifier: [0, 1] images in, logits out, differentiable end to end.

    Args:
        purifier: an ``ImpureModel`` or a baseline purifier (``impure_hf.baselines``).
        classifier: any module taking [0, 1] images and returning logits
            (e.g. ``impure_hf.classifiers.ImageClassifier``).
        num_samples: average the logits over this many purifications (K); only a stochastic
            purifier is run more than once.
        generator: default source of the purifier's randomness when ``forward`` gets none (an
            attack calls ``model(x)``; a seeded generator makes its run reproducible).

    Example:

    ```python
    >>> import torch
    >>> from impure_hf import ImpureModel, PurifiedClassifier
    >>> from impure_hf.classifiers import load_classifier
    >>> purifier = ImpureModel.from_preset("impure-vit-tiny").eval()
    >>> defended = PurifiedClassifier(purifier, load_classifier("efficientnet_lite0"), num_samples=4)
    >>> defended(torch.rand(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
    ```
    """

    def __init__(
        self,
        purifier: nn.Module,
        classifier: nn.Module,
        num_samples: int = 1,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.purifier = purifier
        self.classifier = classifier
        self.num_samples = num_samples
        self.generator = generator
        # mirror the wrapped modules' mode without changing it: torchattacks puts a model back
        # into training mode after an attack if it was in training mode before
        self.training = purifier.training and classifier.training

    @property
    def stochastic(self) -> bool:
        return is_stochastic(self.purifier)

    @property
    def labels(self) -> Optional[list[str]]:
        return getattr(self.classifier, "labels", None)

    def forward(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        generator = generator if generator is not None else self.generator
        samples = self.num_samples if self.stochastic else 1
        logits = self.classifier(purified_pixel_values(self.purifier, pixel_values, generator))
        for _ in range(samples - 1):
            logits = logits + self.classifier(purified_pixel_values(self.purifier, pixel_values, generator))
        return logits / samples


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

    config = PurifiedImageClassificationConfig.for_modules(purifier, classifier, num_samples)
    model = PurifiedImageClassification(config, purifier=purifier, classifier=classifier, generator=generator)
    if image_processor is None:
        size = purifier.config.image_size
        image_processor = ImpureImageProcessor(crop_size=size)
    base_logger = logging.getLogger("transformers.pipelines.base")
    quiet = _DropUnsupportedModelMessage()
    base_logger.addFilter(quiet)
    try:
        return pipeline("image-classification", model=model, image_processor=image_processor, **pipeline_kwargs)
    finally:
        base_logger.removeFilter(quiet)


__all__ = [
    "PurifiedClassifier",
    "PurifiedImageClassification",
    "PurifiedImageClassificationConfig",
    "amplified_perturbation",
    "is_stochastic",
    "purified_pipeline",
    "purified_pixel_values",
]
