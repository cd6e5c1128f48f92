"""Training IMPure purifiers with Accelerate: one CPU, one GPU, many GPUs or nodes, one command.

    impure train --config configs/train_paper.yaml --dataset data/impure-adv --output-dir runs/vit-b
    accelerate launch --config_file configs/multi_gpu.yaml -m impure_hf.train --config ...

Each step purifies the adversarial images (random division, random noise: the model's train mode),
and minimises [`PurificationLoss`]: L1 to the clean image in the model's normalised space plus a
perceptual loss on the RCM mix of purified and adversarial patches. Validation after every epoch
purifies the adversarial validation images the way inference does (eval mode, fixed generator)
and reports PSNR and L1 to the clean images and the target classifier's top-1; the best model is
kept. Checkpoints (``accelerator.save_state``) every ``save_steps`` optimizer steps and every
epoch resume exactly; the final weights are a ``save_pretrained`` folder with the processor.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import itertools
import math
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import torch
from torch import nn

from ._utils import CorruptFileError, atomic_save_with, atomic_write_json, atomic_write_text, read_json
from .image_processing_impure import ImpureImageProcessor
from .losses import PerceptualLoss, PurificationLoss, RandomCombination
from .modeling_impure import ImpureModel

PERCEPTUAL_LOSSES = ("none", "vgg19", "vgg19_bn_release", "classifier")
MIXED_PRECISION = ("no", "fp16", "bf16")
REQUIRED_COLUMNS = ("clean", "adversarial")
TRAINER_STATE = "trainer_state.json"
# what a run writes into output_dir: their presence means a previous run is there (other files,
# e.g. finetune's pairs/, may share the folder)
RUN_OUTPUTS = (
    "checkpoints", "best", "logs", TRAINER_STATE, "training_log.csv", "training_config.json",
    "loss_curves.png", "model.safetensors", "config.json",
)


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
        import yaml

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
            import yaml

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


# ---------------------------------------------------------------------------------- data
def _collate(processor: ImpureImageProcessor, rows: list[dict]) -> dict[str, torch.Tensor]:
    batch = {key: processor([row[key] for row in rows])["pixel_values"] for key in REQUIRED_COLUMNS}
    if "label" in rows[0]:
        batch["labels"] = torch.tensor([row["label"] for row in rows], dtype=torch.long)
    return batch


def random_crop_pairs(
    clean: torch.Tensor, adversarial: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random square crop, and a random horizontal flip, of each clean/adversarial pair.

    Training on crops is far cheaper than on whole images, and the purifier works on any window of
    its position grid (the release trains 224 px windows of a 448 px table the same way).
    """
    n, _, height, width = clean.shape
    if size > min(height, width):
        raise ValueError(f"train_crop_size {size} is larger than the training images ({height}x{width})")
    device = generator.device
    tops = torch.randint(0, height - size + 1, (n,), generator=generator, device=device).tolist()
    lefts = torch.randint(0, width - size + 1, (n,), generator=generator, device=device).tolist()
    flips = torch.rand(n, generator=generator, device=device).lt(0.5).tolist()
    crops = []
    for images in (clean, adversarial):
        out = torch.stack([images[i, :, t : t + size, l : l + size] for i, (t, l) in enumerate(zip(tops, lefts))])
        flip = torch.tensor(flips, device=out.device).view(n, 1, 1, 1)
        crops.append(torch.where(flip, out.flip(-1), out))
    return crops[0], crops[1]


def check_columns(dataset, name: str = "dataset") -> None:
    """Raise a clear error unless ``dataset`` has the ``clean`` and ``adversarial`` image columns."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # a stream without declared features: look at the first row
        columns = list(next(iter(dataset)).keys())
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"the {name} lacks the column(s) {missing} (it has {list(columns)}); IMPure training needs the "
            "image columns 'clean' and 'adversarial' (optionally 'label'), as built by `impure make-dataset`"
        )


def _resolve_datasets(config: TrainingConfig, train_dataset, eval_dataset):
    """(train, eval or None) from the arguments or ``config.dataset``, DatasetDicts split by name."""
    if train_dataset is None:
        if config.dataset is None:
            raise ValueError("no training data: pass train_dataset= or set dataset (a folder or Hub id)")
        from .data import load_adversarial_dataset

        train_dataset = load_adversarial_dataset(config.dataset, streaming=config.streaming)
    if isinstance(train_dataset, dict):  # DatasetDict / IterableDatasetDict
        splits = train_dataset
        if config.train_split not in splits:
            raise ValueError(f"the dataset has no split {config.train_split!r} to train on; splits: {list(splits)}")
        train_dataset = splits[config.train_split]
        if eval_dataset is None and config.eval_split is not None and config.eval_split in splits:
            eval_dataset = splits[config.eval_split]
    check_columns(train_dataset, "training dataset")
    if eval_dataset is not None:
        check_columns(eval_dataset, "validation dataset")
    return train_dataset, eval_dataset


# ---------------------------------------------------------------------------------- pieces
def encoder_parameters(model: ImpureModel) -> list[tuple[str, nn.Parameter]]:
    """The encoder's parameters (everything before ``decoder_embed``): frozen by ``freeze_encoder``."""
    return [(n, p) for n, p in model.named_parameters() if not n.startswith("decoder_") and n != "mask_token"]


def _build_model(config: TrainingConfig, model: Optional[ImpureModel]) -> ImpureModel:
    if model is None:
        from .hub import load_purifier

        model = load_purifier(config.model, **config.model_overrides)
    if config.freeze_encoder:
        for _, parameter in encoder_parameters(model):
            parameter.requires_grad_(False)
    if model.config.image_mask != "occlude":
        # unused in this configuration; DDP needs every trainable parameter to get a gradient
        model.mask_token.requires_grad_(False)
    if config.gradient_checkpointing:
        # transformers >= 5 renamed gradient checkpointing to activation checkpointing
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model.train()


def _build_perceptual(config: TrainingConfig, classifier: Optional[nn.Module]) -> Optional[PerceptualLoss]:
    if config.perceptual_loss == "none":
        return None
    if config.perceptual_loss == "classifier":
        if classifier is None:
            raise ValueError("perceptual_loss 'classifier' needs a target classifier: pass classifier= or set classifier")
        layers = config.perceptual_layers
        return PerceptualLoss.from_classifier(classifier, *(zip(*layers.items()) if layers else ()))
    preset = getattr(PerceptualLoss, config.perceptual_loss)  # vgg19 or vgg19_bn_release
    return preset(weights="DEFAULT" if config.perceptual_pretrained else None, layers=config.perceptual_layers)


def _trackers(report_to: str) -> Optional[list[str]]:
    if report_to == "none":
        return None
    if report_to == "auto":
        from accelerate.utils import is_tensorboard_available

        return ["tensorboard"] if bool(is_tensorboard_available()) else None
    return [name.strip() for name in report_to.split(",") if name.strip()]


def _checkpoint_index(path: Path) -> int:
    return int(re.findall(r"(\d+)$", path.name)[0])


def _complete(folder: Path) -> bool:
    """A checkpoint is complete when its trainer state (written last) exists and reads."""
    try:
        read_json(folder / TRAINER_STATE)
    except FileNotFoundError:
        return False
    except CorruptFileError as err:
        warnings.warn(f"{err}: skipping this checkpoint")
        return False
    return True


def _previous_run(config: TrainingConfig) -> list[str]:
    """The files of a previous run in ``output_dir`` (empty when there is none)."""
    out = Path(config.output_dir)
    return [name for name in RUN_OUTPUTS if (out / name).exists()] if out.is_dir() else []


def _find_checkpoint(config: TrainingConfig) -> Optional[Path]:
    if config.resume is None:
        return None
    if config.resume != "latest":
        path = Path(config.resume)
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"cannot resume from {path}: not a checkpoint folder of impure train (no {TRAINER_STATE})")
        return path
    folders = sorted((Path(config.output_dir) / "checkpoints").glob("checkpoint_*"), key=_checkpoint_index)
    folders = [f for f in folders if _complete(f)]  # a save cut short has no (readable) trainer state
    if not folders:
        raise FileNotFoundError(f"--resume latest: no checkpoint in {Path(config.output_dir) / 'checkpoints'}")
    return folders[-1]


# ---------------------------------------------------------------------------------- validation
@torch.no_grad()
def _batch_metrics(model, batch: dict, classifier: Optional[nn.Module], generator: torch.Generator) -> torch.Tensor:
    """(B, 2 or 3) per-image PSNR, L1 and top-1 correctness of the purified adversarial images."""
    purified = model(batch["adversarial"], generator=generator).purified_pixel_values.float()
    clean = batch["clean"].float()
    mse = (purified - clean).pow(2).flatten(1).mean(dim=1)
    columns = [10 * torch.log10(1 / mse.clamp_min(1e-10)), (purified - clean).abs().flatten(1).mean(dim=1)]
    if classifier is not None:
        # without labels, the classifier's clean prediction is the label (untargeted attacks do the same)
        labels = batch["labels"] if "labels" in batch else classifier(clean).argmax(dim=-1)
        columns.append((classifier(purified).argmax(dim=-1) == labels).float())
    return torch.stack(columns, dim=1)


def _summarise(rows: torch.Tensor) -> dict[str, float]:
    names = ("psnr", "l1", "top1")[: rows.shape[1]]
    return {name: float(value) for name, value in zip(names, rows.double().mean(dim=0))}


def validation_metrics(
    model: ImpureModel,
    dataset,
    classifier: Optional[nn.Module] = None,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """PSNR (dB) and L1 of the purified adversarial images against the clean ones, and the
    classifier's top-1 (fraction) on them: the metrics validation reports, on one process."""
    check_columns(dataset)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    processor = ImpureImageProcessor(crop_size=model.config.image_size, resize_shortest_edge=model.config.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=partial(_collate, processor))
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = [
        _batch_metrics(model, {k: v.to(device) for k, v in batch.items()}, classifier, generator) for batch in loader
    ]
    model.train(was_training)
    return _summarise(torch.cat(rows))


# ---------------------------------------------------------------------------------- reports
def _write_csv(path: Path, history: list[dict]) -> None:
    """One row per logged step or validation."""
    columns = list(dict.fromkeys(key for row in history for key in row))
    columns.sort(key=lambda k: (k.startswith("train/"), k.startswith("eval/")))  # step, epoch, lr, train/*, eval/*
    with io.StringIO(newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(path, handle.getvalue())


def _plot_curves(path: Path, history: list[dict]) -> None:
    """The training loss terms in one panel and each validation metric in its own, against the step."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    columns = list(dict.fromkeys(key for row in history for key in row))
    train_keys = [k for k in columns if k.startswith("train/")]
    panels = ([("training loss", train_keys)] if train_keys else []) + [(k, [k]) for k in columns if k.startswith("eval/")]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels):
        for key in keys:
            steps, values = zip(*[(row["step"], row[key]) for row in history if key in row])
            axis.plot(steps, values, marker="o" if key.startswith("eval/") else None, label=key.split("/", 1)[1])
        axis.set(xlabel="optimizer step", title=title)
        if len(keys) > 1:
            axis.legend(fontsize="small")
    figure.tight_layout()
    atomic_save_with(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    plt.close(figure)


# ---------------------------------------------------------------------------------- training
class ImpureTrainer:
    """The training loop behind [`train`]; subclass it to change a step, validation or saving.

    Construction does all the setup, so a bad config, dataset or checkpoint fails before the
    first step; ``run()`` trains and returns the unwrapped model in eval mode.
    Arguments as [`train`].
    """

    def __init__(
        self,
        config: Union[TrainingConfig, dict, None] = None,
        model: Optional[ImpureModel] = None,
        train_dataset=None,
        eval_dataset=None,
        classifier: Union[nn.Module, str, None] = None,
    ):
        from accelerate import Accelerator, DataLoaderConfiguration
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration, set_seed

        if config is None:
            config = TrainingConfig()
        elif isinstance(config, dict):
            config = TrainingConfig.from_dict(config)
        self.config = config
        self.output_dir = Path(config.output_dir)
        previous = _previous_run(config)
        if previous and config.resume is None and not config.overwrite_output_dir:
            raise FileExistsError(
                f"{self.output_dir} holds a previous run ({', '.join(previous)}); pass --resume latest to continue it, "
                "--overwrite-output-dir to replace it, or choose another --output-dir"
            )
        train_dataset, eval_dataset = _resolve_datasets(config, train_dataset, eval_dataset)
        self.sized = hasattr(train_dataset, "__len__")
        if not self.sized and config.max_steps is None:
            raise ValueError("a streamed (unsized) training dataset needs max_steps")
        if self.sized and len(train_dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.resume_from = _find_checkpoint(config)

        # as transformers' TrainingArguments: a new run may change mixed precision (the process
        # group, kept in PartialState, survives)
        AcceleratorState._reset_state()
        self.accelerator = accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=_trackers(config.report_to),
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir),
                logging_dir=str(self.output_dir / "logs"),
                # save_checkpoint names and rotates checkpoints itself: accelerate's rotation deletes
                # the oldest before the new one is written, so a kill could leave none
                automatic_checkpoint_naming=False,
            ),
            # data order depends only on (seed, epoch), so a resumed run sees the same batches
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        )
        if previous and config.resume is None and accelerator.is_main_process:  # --overwrite-output-dir
            for name in ("checkpoints", "best"):  # stale ones would mix with the new run's
                shutil.rmtree(self.output_dir / name, ignore_errors=True)
        accelerator.wait_for_everyone()
        set_seed(config.seed)
        model = _build_model(config, model)
        if isinstance(classifier, str) or (classifier is None and config.classifier is not None):
            from .classifiers import load_classifier

            classifier = load_classifier(classifier or config.classifier)
        if classifier is not None:
            classifier = classifier.to(accelerator.device).eval().requires_grad_(False)
        self.classifier = classifier
        self.objective = PurificationLoss(
            model.config.image_mean,
            model.config.image_std,
            perceptual=_build_perceptual(config, classifier),
            rcm=RandomCombination(model.config.patch_size, config.rcm_max_chunks) if config.rcm else None,
        ).to(accelerator.device)

        # images of the model's size pass unchanged; others are resized and centre-cropped
        size = model.config.image_size
        self.processor = ImpureImageProcessor(crop_size=size, resize_shortest_edge=size)
        collate = partial(_collate, self.processor)
        train_loader = torch.utils.data.DataLoader(
            train_dataset, batch_size=config.batch_size, shuffle=self.sized, collate_fn=collate, num_workers=config.num_workers
        )
        from timm.optim import param_groups_weight_decay

        # the release's groups: no weight decay for biases and 1-d parameters (norms)
        optimizer = torch.optim.AdamW(
            param_groups_weight_decay(model, config.weight_decay),
            lr=config.learning_rate,
            betas=config.adam_betas,
            eps=config.adam_epsilon,
        )
        self.model, self.optimizer, self.train_loader = accelerator.prepare(model, optimizer, train_loader)
        self.eval_loader = None
        if eval_dataset is not None:
            eval_loader = torch.utils.data.DataLoader(
                eval_dataset, batch_size=config.eval_batch_size or config.batch_size, collate_fn=collate, num_workers=config.num_workers
            )
            self.eval_loader = accelerator.prepare(eval_loader)

        steps_per_epoch = math.ceil(len(self.train_loader) / config.gradient_accumulation_steps) if self.sized else 0
        self.total_steps = config.max_steps or config.num_epochs * steps_per_epoch
        self.num_epochs = math.ceil(self.total_steps / steps_per_epoch) if self.sized else None
        warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_epochs * steps_per_epoch)
        from transformers import get_cosine_schedule_with_warmup

        # Accelerate steps a prepared scheduler once per process on every optimizer step
        scheduler = get_cosine_schedule_with_warmup(
            self.optimizer,
            min(warmup, self.total_steps) * accelerator.num_processes,
            self.total_steps * accelerator.num_processes,
        )
        self.scheduler = accelerator.prepare(scheduler)

        # the purifier's noise and the RCM masks come from one generator per process
        self.generator = torch.Generator(device=accelerator.device).manual_seed(config.seed + accelerator.process_index)
        self.state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "history": [], "best": None}
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        # new checkpoints never overwrite existing ones
        existing = [_checkpoint_index(p) for p in (self.output_dir / "checkpoints").glob("checkpoint_*")]
        accelerator.project_configuration.iteration = max(existing, default=-1) + 1

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """Loss terms of one micro-batch (backward and optimizer step are done by ``run``)."""
        clean, adversarial = batch["clean"], batch["adversarial"]
        if self.config.train_crop_size is not None:
            clean, adversarial = random_crop_pairs(clean, adversarial, self.config.train_crop_size, self.generator)
        output = self.model(adversarial, generator=self.generator)
        return self.objective(output.reconstruction, clean, adversarial, generator=self.generator)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Metrics on the validation set (all processes); keeps the best model in ``output_dir/best``."""
        accelerator, state = self.accelerator, self.state
        self.model.eval()
        # the same noise at every validation, so epochs compare fairly
        generator = torch.Generator(device=accelerator.device).manual_seed(self.config.seed + accelerator.process_index)
        rows = []
        for batch in self.eval_loader:
            with accelerator.autocast():
                rows.append(accelerator.gather_for_metrics(_batch_metrics(self.model, batch, self.classifier, generator)))
        self.model.train()
        metrics = _summarise(torch.cat(rows))
        record = {"step": state["global_step"], "epoch": state["epoch"], **{f"eval/{k}": v for k, v in metrics.items()}}
        state["history"].append(record)
        accelerator.log({k: v for k, v in record.items() if k.startswith("eval/")}, step=state["global_step"])
        accelerator.print(f"epoch {state['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        key = "top1" if "top1" in metrics else "psnr"
        if state["best"] is None or metrics[key] > state["best"]["value"]:
            state["best"] = {"metric": key, "value": metrics[key], "step": state["global_step"], "epoch": state["epoch"]}
            self.save_model(self.output_dir / "best")
        return metrics

    # ------------------------------------------------------------------ saving
    def save_checkpoint(self) -> Path:
        """``save_state`` plus this trainer's state: a folder ``--resume`` continues from exactly.

        Written to a hidden temporary folder and renamed when complete; only then are checkpoints
        beyond ``total_limit`` deleted (oldest first), so a kill at any moment leaves the last one.
        """
        from safetensors.torch import save_file

        accelerator = self.accelerator
        checkpoints = self.output_dir / "checkpoints"
        index = accelerator.project_configuration.iteration
        folder, temporary = checkpoints / f"checkpoint_{index}", checkpoints / f".checkpoint_{index}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)  # left by a killed save
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))  # increments project_configuration.iteration
        save_file({"state": self.generator.get_state()}, str(temporary / f"generator_{accelerator.process_index}.safetensors"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            atomic_write_json(temporary / TRAINER_STATE, self.state, indent=1)
            os.replace(temporary, folder)
            self._rotate_checkpoints(folder)
            _write_csv(self.output_dir / "training_log.csv", self.state["history"])
        accelerator.wait_for_everyone()
        return folder

    def _rotate_checkpoints(self, newest: Path) -> None:
        """Keep the ``total_limit`` newest complete checkpoints; drop older incomplete leftovers."""
        folders = sorted(newest.parent.glob("checkpoint_*"), key=_checkpoint_index)
        complete = [f for f in folders if (f / TRAINER_STATE).is_file()]
        keep = set(complete if self.config.total_limit is None else complete[-self.config.total_limit :]) | {newest}
        for stale in newest.parent.glob(".checkpoint_*.tmp"):
            if stale != newest:
                shutil.rmtree(stale, ignore_errors=True)
        for f in folders:
            if f not in keep and _checkpoint_index(f) < _checkpoint_index(newest):
                shutil.rmtree(f)

    def load_checkpoint(self, folder: Path) -> None:
        from safetensors.torch import load_file

        # the trainer state is written last: read it first, so an incomplete checkpoint is named
        state = read_json(folder / TRAINER_STATE, hint="resume from another checkpoint")
        self.accelerator.load_state(str(folder))
        self.state = state
        generator_file = folder / f"generator_{self.accelerator.process_index}.safetensors"
        self.generator.set_state(load_file(str(generator_file))["state"])
        self.accelerator.print(f"resumed from {folder} at step {self.state['global_step']}")

    def save_model(self, folder: Path) -> None:
        """``save_pretrained`` (safetensors) and the image processor, each file renamed into place."""
        state_dict = self.accelerator.get_state_dict(self.model)  # on all processes: gathers sharded weights
        if self.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            temporary = folder / ".saving.tmp"
            shutil.rmtree(temporary, ignore_errors=True)
            self.accelerator.unwrap_model(self.model).save_pretrained(temporary, state_dict=state_dict)
            self.processor.save_pretrained(temporary)
            for path in temporary.iterdir():  # each file is replaced in one step
                os.replace(path, folder / path.name)
            temporary.rmdir()

    # ------------------------------------------------------------------ loop
    def _log(self, window: dict[str, torch.Tensor], batches: int, progress) -> None:
        accelerator, state = self.accelerator, self.state
        means = {name: accelerator.reduce(total / batches, "mean").item() for name, total in window.items()}
        record = {"step": state["global_step"], "epoch": state["epoch"], "lr": self.scheduler.get_last_lr()[0]}
        record.update({f"train/{name}": value for name, value in means.items()})
        state["history"].append(record)
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state["global_step"])
        progress.set_postfix(loss=f"{means['loss']:.4f}")

    def run(self) -> ImpureModel:
        from tqdm.auto import tqdm

        accelerator, config, state = self.accelerator, self.config, self.state
        model, optimizer, scheduler = self.model, self.optimizer, self.scheduler
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.output_dir / "training_config.json", config.to_dict(), indent=1)
        tracked = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}
        accelerator.init_trackers("impure", config=tracked)
        progress = tqdm(total=self.total_steps, initial=state["global_step"], desc="training", disable=not accelerator.is_local_main_process)
        window: dict[str, torch.Tensor] = {}
        batches = 0
        model.train()
        # a stream has no length: its epochs repeat until max_steps
        epochs = range(state["epoch"], self.num_epochs) if self.sized else itertools.count(state["epoch"])
        for epoch in epochs:
            if state["global_step"] >= self.total_steps:
                break
            self.train_loader.set_epoch(epoch)
            skip = state["batches_in_epoch"]
            loader = accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
            for batch in loader:
                with accelerator.accumulate(model), accelerator.autocast():
                    terms = self.training_step(batch)
                    accelerator.backward(terms["loss"])
                    if accelerator.sync_gradients and config.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                state["batches_in_epoch"] += 1
                for name, value in terms.items():
                    window[name] = window.get(name, 0.0) + value.detach().float()
                batches += 1
                if not accelerator.sync_gradients:
                    continue
                state["global_step"] += 1
                progress.update(1)
                if state["global_step"] % config.logging_steps == 0 or state["global_step"] == self.total_steps:
                    self._log(window, batches, progress)
                    window, batches = {}, 0
                if config.save_steps and state["global_step"] % config.save_steps == 0:
                    self.save_checkpoint()
                at_epoch_end = self.sized and state["batches_in_epoch"] == len(self.train_loader)
                if state["global_step"] >= self.total_steps and not at_epoch_end:
                    break  # max_steps inside the epoch
            else:  # the epoch ran to its end
                if not state["batches_in_epoch"]:
                    raise ValueError("the training dataset yielded no batch")
                state["epoch"], state["batches_in_epoch"] = epoch + 1, 0
                last = state["global_step"] >= self.total_steps
                if self.eval_loader is not None and (state["epoch"] % config.eval_epochs == 0 or last):
                    self.validate()
                if not (config.save_steps and state["global_step"] % config.save_steps == 0):
                    self.save_checkpoint()
        progress.close()
        if state["batches_in_epoch"] and self.eval_loader is not None:  # stopped by max_steps inside an epoch
            self.validate()

        self.save_model(self.output_dir)
        if accelerator.is_main_process:
            atomic_write_json(self.output_dir / TRAINER_STATE, state, indent=1)
            _write_csv(self.output_dir / "training_log.csv", state["history"])
            _plot_curves(self.output_dir / "loss_curves.png", state["history"])
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return accelerator.unwrap_model(model).eval()


def train(
    config: Union[TrainingConfig, dict, None] = None,
    model: Optional[ImpureModel] = None,
    train_dataset=None,
    eval_dataset=None,
    classifier: Union[nn.Module, str, None] = None,
) -> ImpureModel:
    """Train (or continue training) a purifier; returns the trained model, unwrapped, in eval mode.

    Writes to ``config.output_dir``: the final ``save_pretrained`` folder (model.safetensors,
    config.json, preprocessor_config.json), ``best/`` (best validation), ``checkpoints/``,
    ``training_log.csv``, ``loss_curves.png``, ``trainer_state.json`` and tracker logs.

    Args:
        config: a [`TrainingConfig`] (or a dict of its fields).
        model: the purifier to train (default: built from ``config.model``).
        train_dataset: a ``datasets`` Dataset / IterableDataset with ``clean`` and ``adversarial``
            image columns (and optionally ``label``), or a DatasetDict split by
            ``config.train_split`` / ``eval_split``. Default: ``config.dataset``.
        eval_dataset: validation data (default: the DatasetDict's ``eval_split``).
        classifier: target classifier ([0, 1] images in, logits out) or its name, for validation
            top-1 and the ``"classifier"`` perceptual loss. Default: ``config.classifier``.
    """
    return ImpureTrainer(config, model, train_dataset, eval_dataset, classifier).run()


# Fine-tuning defaults (the release fine-tunes with a lower rate for fewer epochs); any
# TrainingConfig field given to `finetune` overrides them.
FINETUNE_DEFAULTS = dict(
    perceptual_loss="classifier",
    learning_rate=1e-5,
    num_epochs=10,
    warmup_epochs=1.0,
    output_dir="outputs/impure-finetune",
)


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
    from .hub import load_purifier

    if isinstance(purifier, str):
        purifier = load_purifier(purifier)
    if isinstance(classifier, str):
        from .classifiers import load_classifier

        classifier = load_classifier(classifier)
    num_classes = check_classifier(classifier, purifier.config.image_size)
    settings = TrainingConfig.from_dict({**FINETUNE_DEFAULTS, **config})
    if isinstance(dataset, (str, Path)):
        settings.dataset, dataset = str(dataset), None
    if dataset is None and settings.dataset is not None:
        from .data import load_adversarial_dataset

        dataset = load_adversarial_dataset(settings.dataset, streaming=settings.streaming)
    for data in (dataset, eval_dataset):
        if data is not None:
            _check_label_set(data, classifier, num_classes)
    return train(settings, purifier, dataset, eval_dataset, classifier)


# ---------------------------------------------------------------------------------- command line
def _add_arguments(parser: argparse.ArgumentParser) -> None:
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


def _run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"impure train: {err}", file=sys.stderr)
        return 2
    try:
        train(config)
    except (FileExistsError, CorruptFileError) as err:  # a previous run in --output-dir, a corrupt checkpoint: one line
        print(f"impure train: {err}", file=sys.stderr)
        return 2
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a purifier (also: accelerate launch -m impure_hf.train)",
        description="Train an IMPure purifier with Accelerate. Options come from --config (YAML) and flags.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=_run)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m impure_hf.train", description="Train an IMPure purifier with Accelerate.")
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["TrainingConfig", "ImpureTrainer", "train", "finetune", "FINETUNE_DEFAULTS", "check_classifier", "validation_metrics", "check_columns", "encoder_parameters"]
