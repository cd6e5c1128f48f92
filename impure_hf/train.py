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
import io
import itertools
import math
import os
import re
import shutil
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Optional, Union

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, set_seed
from matplotlib.figure import Figure
from safetensors.torch import load_file, save_file
from timm.optim import param_groups_weight_decay
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ._utils import CorruptFileError, atomic_save_with, atomic_write_json, atomic_write_text, read_json
from .classifiers import check_classifier, load_classifier  # noqa: F401  (check_classifier: its old home)
from .data import (  # noqa: F401  (random_crop_pairs, check_columns: their old home was here)
    REQUIRED_COLUMNS,
    check_columns,
    collate_pairs,
    load_adversarial_dataset,
    random_crop_pairs,
)
from .image_processing_impure import ImpureImageProcessor
from .loading import load_purifier
from .losses import PerceptualLoss, PurificationLoss, RandomCombination
from .modeling_impure import ImpureModel
from .training_args import (  # noqa: F401  (their home before train.py outgrew 700 lines)
    MIXED_PRECISION,
    PERCEPTUAL_LOSSES,
    TrainingConfig,
    add_arguments,
    config_from_args,
)

TRAINER_STATE = "trainer_state.json"
# what a run writes into output_dir: their presence means a previous run is there (other files,
# e.g. finetune's pairs/, may share the folder)
RUN_OUTPUTS = (
    "checkpoints", "best", "logs", TRAINER_STATE, "training_log.csv", "training_config.json",
    "loss_curves.png", "model.safetensors", "config.json",
)


# ---------------------------------------------------------------------------------- data
def _resolve_datasets(config: TrainingConfig, train_dataset, eval_dataset):
    """(train, eval or None) from the arguments or ``config.dataset``, DatasetDicts split by name."""
    if train_dataset is None:
        if config.dataset is None:
            raise ValueError("no training data: pass train_dataset= or set dataset (a folder or Hub id)")
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
    processor = ImpureImageProcessor(crop_size=model.config.image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=partial(collate_pairs, processor))
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
    columns = list(dict.fromkeys(key for row in history for key in row))
    train_keys = [k for k in columns if k.startswith("train/")]
    panels = ([("training loss", train_keys)] if train_keys else []) + [(k, [k]) for k in columns if k.startswith("eval/")]
    if not panels:
        return
    figure = Figure(figsize=(5 * len(panels), 4))  # no pyplot: files only, the user's backend untouched
    axes = figure.subplots(1, len(panels), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels):
        for key in keys:
            steps, values = zip(*[(row["step"], row[key]) for row in history if key in row])
            axis.plot(steps, values, marker="o" if key.startswith("eval/") else None, label=key.split("/", 1)[1])
        axis.set(xlabel="optimizer step", title=title)
        if len(keys) > 1:
            axis.legend(fontsize="small")
    figure.tight_layout()
    atomic_save_with(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))


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
        self.processor = ImpureImageProcessor(crop_size=size)
        collate = partial(collate_pairs, self.processor)
        train_loader = torch.utils.data.DataLoader(
            train_dataset, batch_size=config.batch_size, shuffle=self.sized, collate_fn=collate, num_workers=config.num_workers
        )
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
        if self.config.clean_fraction > 0:
            # some images go in unattacked: RCM then mixes the purified image with the clean one
            pick = torch.rand(clean.shape[0], generator=self.generator, device=self.generator.device) < self.config.clean_fraction
            adversarial = torch.where(pick.to(clean.device).view(-1, 1, 1, 1), clean, adversarial)
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


# ---------------------------------------------------------------------------------- command line
def run(args: argparse.Namespace) -> int:
    """``impure train``."""
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


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m impure_hf.train", description="Train an IMPure purifier with Accelerate.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "check_columns",
    "encoder_parameters",
    "ImpureTrainer",
    "train",
    "TrainingConfig",
    "validation_metrics",
]
