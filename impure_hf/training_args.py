"""``TrainingConfig``: the options of a training run, from Python, a YAML file or ``impure train`` flags.

Split from train.py (which runs the training) to keep both readable; imports nothing of the package,
so train.py, finetuning.py and the CLI can all build a config.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

PERCEPTUAL_LOSSES = ("none", "vgg19", "vgg19_bn_release", "classifier")
MIXED_PRECISION = ("no", "fp16", "bf16")


# ---------------------------------------------------------------------------------- configuration
def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainingConfig:
    """Everything a training run needs; defaults are the paper's (DESIGN.md section 2).

    Build it in Python, from a YAML file (``TrainingConfig.from_yaml``) or from ``impure train``
    flags (which override the file). Bad values raise ``ValueError`` here, before any training.
    """

    # model and data
    model: str = _help("preset name, saved folder or Hub id of the purifier to start from", default="impure-vit-b")
    model_overrides: dict = _help("ImpureConfig overrides, e.g. {image_size: 64, patch_size: 8}", default_factory=dict)
    dataset: Optional[str] = _help("adversarial dataset: `impure make-dataset` folder or Hub id (columns clean, adversarial)", default=None)
    train_split: str = _help("split to train on", default="train")
    eval_split: Optional[str] = _help("split validated after every eval_epochs epochs ('none': no validation)", default="validation")
    eval_epochs: int = _help("validate every N epochs (and at the end)", default=1)
    streaming: bool = _help("stream the dataset instead of loading it (needs --max-steps)", default=False)
    classifier: Optional[str] = _help("target classifier (impure_hf.classifiers.load_classifier name) for validation top-1 and the 'classifier' perceptual loss", default=None)
    output_dir: str = _help("folder for checkpoints, logs and the final model", default="outputs/impure")
    # optimisation
    num_epochs: int = _help("epochs", default=100)
    max_steps: Optional[int] = _help("stop after this many optimizer steps (overrides num_epochs)", default=None)
    batch_size: int = _help("images per process and micro-batch", default=32)
    eval_batch_size: Optional[int] = _help("validation batch size (default: batch_size)", default=None)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", default=1)
    learning_rate: float = _help("peak AdamW learning rate", default=1e-4)
    weight_decay: float = _help("AdamW weight decay (not applied to biases and 1-d parameters)", default=0.05)
    adam_betas: tuple = _help("AdamW betas", default=(0.9, 0.95))
    adam_epsilon: float = _help("AdamW epsilon", default=1e-8)
    warmup_epochs: float = _help("linear warm-up before the cosine decay, in epochs", default=5.0)
    warmup_steps: Optional[int] = _help("warm-up in optimizer steps (overrides warmup_epochs)", default=None)
    max_grad_norm: Optional[float] = _help("clip gradients to this norm ('none': no clipping)", default=None)
    mixed_precision: Optional[str] = _help("'no', 'fp16' or 'bf16' (Accelerate autocast); none: the launcher's setting (accelerate config / launch flags), else 'no'", default=None)
    gradient_checkpointing: bool = _help("recompute transformer blocks in backward to save memory", default=False)
    freeze_encoder: bool = _help("train only the decoder side (fine-tuning)", default=False)
    train_crop_size: Optional[int] = _help("train on random aligned crops (with flips) of this side from each clean/adversarial pair; the position window covers the rest", default=None)
    clean_fraction: float = _help("fraction of training images given to the purifier clean instead of attacked (the loss still asks for the clean image), so that it learns to keep clean images' predictions too", default=0.0)
    # losses
    perceptual_loss: str = _help("'vgg19' (paper), 'vgg19_bn_release' (authors' code), 'classifier' (the target classifier's layers) or 'none'", default="vgg19")
    perceptual_pretrained: bool = _help("ImageNet weights for the VGG perceptual networks (torchvision)", default=True)
    perceptual_layers: Optional[dict] = _help("{layer name: weight} overriding the perceptual loss's layers", default=None)
    rcm: bool = _help("random combination of purified and adversarial patches before the perceptual loss", default=True)
    rcm_max_chunks: int = _help("largest number of RCM chunks (release: 4)", default=4)
    # bookkeeping
    seed: int = _help("seed of initialisation, data order and the purifier's noise", default=0)
    save_steps: Optional[int] = _help("save_state every N optimizer steps (a state is also saved every epoch)", default=None)
    total_limit: Optional[int] = _help("keep at most this many checkpoints ('none': all)", default=3)
    resume: Optional[str] = _help("'latest' (in output_dir) or a checkpoint folder to continue from", default=None)
    overwrite_output_dir: bool = _help("start a new run in an output_dir that holds a previous one (its checkpoints and best/ are deleted); without it such a folder needs --resume", default=False)
    logging_steps: int = _help("log the loss every N optimizer steps", default=10)
    report_to: str = _help("Accelerate trackers: 'auto' (tensorboard when installed), 'none', or names joined by commas", default="auto")
    num_workers: int = _help("DataLoader worker processes", default=0)

    def __post_init__(self):
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, hints[f.name], getattr(self, f.name)))
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "logging_steps", "rcm_max_chunks", "eval_epochs"):
            check(getattr(self, name) >= 1, f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("max_steps", "eval_batch_size", "save_steps", "total_limit"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{name} must be a positive integer or none, got {value}")
        check(math.isfinite(self.learning_rate) and self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}")
        check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        check(self.adam_epsilon > 0, f"adam_epsilon must be positive, got {self.adam_epsilon}")
        check(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        check(self.warmup_steps is None or self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, f"max_grad_norm must be positive or none, got {self.max_grad_norm}")
        check(self.mixed_precision in (None, *MIXED_PRECISION), f"mixed_precision must be one of {MIXED_PRECISION} or none, got {self.mixed_precision!r}")
        check(self.perceptual_loss in PERCEPTUAL_LOSSES, f"perceptual_loss must be one of {PERCEPTUAL_LOSSES}, got {self.perceptual_loss!r}")
        check(self.rcm_max_chunks >= 2, f"rcm_max_chunks must be at least 2, got {self.rcm_max_chunks}")
        check(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        check(0 <= self.clean_fraction <= 1, f"clean_fraction must lie in [0, 1], got {self.clean_fraction}")
        check(self.train_crop_size is None or self.train_crop_size >= 1, f"train_crop_size must be a positive integer or none, got {self.train_crop_size}")
        if self.perceptual_layers is not None:
            check(isinstance(self.perceptual_layers, dict) and len(self.perceptual_layers) > 0, f"perceptual_layers must be a non-empty mapping of layer name to weight, got {self.perceptual_layers!r}")
            check(self.perceptual_loss != "none", "perceptual_layers given but perceptual_loss is 'none'")
        check(isinstance(self.model_overrides, dict), f"model_overrides must be a mapping, got {self.model_overrides!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainingConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known options: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: Union[str, Path], **overrides) -> "TrainingConfig":
        """Options from a YAML mapping (keys as the field names), then ``overrides`` on top."""
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of training options, got {type(values).__name__}")
        return cls.from_dict({**values, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(name: str, hint, value):
    """Convert YAML / command-line values (strings, lists) to the field's type, or fail clearly."""
    optional = get_origin(hint) is Union and type(None) in get_args(hint)
    if optional:
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint in (int, float):
            if isinstance(value, bool):
                raise TypeError
            number = float(value) if isinstance(value, str) else value
            if hint is int:
                if float(number) != int(number):
                    raise ValueError
                return int(number)
            return float(number)
        if hint in (dict, tuple) and isinstance(value, str):
            value = yaml.safe_load(value)
        if hint is tuple:
            return tuple(float(v) for v in value)
        if hint is dict and not isinstance(value, dict):
            raise TypeError
        if hint is str and not isinstance(value, str):
            raise TypeError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be {getattr(hint, '__name__', hint)}{' or none' if optional else ''}, got {value!r}") from None
    return value


# ---------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``impure train``: ``--config`` and one flag per ``TrainingConfig`` field."""
    parser.add_argument("--config", default=None, help="YAML file of training options (flags override it)")
    hints = get_type_hints(TrainingConfig)
    for f in dataclasses.fields(TrainingConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{f.metadata['help']} (default: {default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif kind is tuple:
            parser.add_argument(flag, nargs=2, metavar=("B1", "B2"), default=argparse.SUPPRESS, help=text)
        else:  # values are converted and checked by TrainingConfig
            parser.add_argument(flag, default=argparse.SUPPRESS, help=text)


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """Defaults, then the YAML file of ``--config``, then the flags given."""
    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    if getattr(args, "config", None):
        return TrainingConfig.from_yaml(args.config, **flags)
    return TrainingConfig.from_dict(flags)


__all__ = ["MIXED_PRECISION", "PERCEPTUAL_LOSSES", "TrainingConfig", "add_arguments", "config_from_args"]
