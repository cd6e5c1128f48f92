"""impure_hf: IMPure adversarial purification as a Hugging Face / torch.hub model package."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_impure import IMAGENET_MEAN, IMAGENET_STD, PRESETS, ImpureConfig
from ._version import __version__
from .image_processing_impure import ImpureImageProcessor
from .loading import DEFAULT_MODEL, load_purifier
from .modeling_impure import ImpureModel, ImpureNoise, ImpureOutput, ImpurePreTrainedModel

# Auto classes, and remote code for saved folders (loadable with trust_remote_code=True
# in a process that never imported impure_hf).
AutoConfig.register(ImpureConfig.model_type, ImpureConfig, exist_ok=True)
AutoModel.register(ImpureConfig, ImpureModel, exist_ok=True)
AutoImageProcessor.register(ImpureConfig, slow_image_processor_class=ImpureImageProcessor, exist_ok=True)
ImpureConfig.register_for_auto_class()
ImpureModel.register_for_auto_class("AutoModel")
ImpureImageProcessor.register_for_auto_class("AutoImageProcessor")


def __getattr__(name):
    # heavier pieces (timm, accelerate, datasets, torchattacks) load on first use, so `import impure_hf`
    # stays light for torch.hub and remote-code users; no package module imports this __init__
    if name == "PurifiedClassifier":
        from .defended import PurifiedClassifier

        return PurifiedClassifier
    if name == "finetune":
        from .finetuning import finetune

        return finetune
    raise AttributeError(f"module 'impure_hf' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "ImpureConfig",
    "ImpureImageProcessor",
    "ImpureModel",
    "ImpureNoise",
    "ImpureOutput",
    "ImpurePreTrainedModel",
    "PurifiedClassifier",
    "__version__",
    "finetune",
    "load_purifier",
]
