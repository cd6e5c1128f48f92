"""Evaluation: the paper's tables, the baselines in the same loop, and white-box adaptive attacks.

Every number is the top-1 accuracy (%) of a target classifier, by default on the images it
classifies correctly (the paper's protocol), for one threat model, attack and defence:

- ``black-box`` (the paper's setting): the attack is crafted on the classifier alone; the
  adversarial images are then purified and classified.
- ``white-box`` (adaptive): the attack is crafted on purifier + classifier end to end, with
  gradients through the purifier (BPDA through the non-differentiable baselines) and EOT over the
  purifier's randomness: PGD-EOT (``pgd-eot``), the randomised AutoAttack (``autoattack-rand``:
  APGD-CE then APGD-DLR with EOT), or any of the nine attacks on logits averaged over EOT samples.

Adversarial images are rounded to 8 bits before the defence by default (as stored images are);
beside the defended numbers, the table gives each attack's success rate on the bare classifier
after (and before) rounding, so an attack that rounding alone undoes is never credited to a
defence. Stochastic defences are evaluated several times with fresh randomness: mean and spread.

Results are cached per cell (classifier x threat model x attack x defence) under the output
folder, so a rerun skips finished cells. Under ``accelerate launch`` the images are sharded across
processes in fixed batches whose random seeds do not depend on the process count, so the table is
the same as a single-process run.

Python: ``evaluate(purifier="impure-vit-tiny", attacks=["pgd"], out_dir="eval")``.
CLI: ``impure evaluate --purifier NAME --attacks pgd fgsm --out eval``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import platform
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ._utils import (
    CorruptFileError,
    atomic_save_safetensors,
    atomic_save_with,
    atomic_write_json,
    atomic_write_text,
    load_safetensors,
    read_json,
)
from .data import process_state

THREAT_MODELS: dict[str, str] = {
    "black-box": "black-box: attack crafted on the classifier alone, then purified",
    "white-box": "white-box adaptive: attack crafted end to end on purifier + classifier "
    "(exact gradients, BPDA for non-differentiable defences, EOT over randomness)",
}
# white-box attacks beyond the nine: PGD and the randomised AutoAttack with EOT gradient averaging
ADAPTIVE_ATTACKS = ("pgd-eot", "autoattack-rand")
CLEAN = "clean"
NO_DEFENCE = "none"


# ---------------------------------------------------------------------------------- the defended model
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


# ---------------------------------------------------------------------------------- images
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
    from .data import BUILD_DIR

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

    Images are resized (shortest edge) and centre-cropped to ``image_size``.
    """
    from PIL import Image

    from .image_processing_impure import ImpureImageProcessor

    if data is not None and _is_dataset(str(data)):
        images, labels, ids = _dataset_images(str(data), split, max_images)
        source = f"{data} [{split}]"
    else:
        if data is None:
            from .data import foolbox_imagenet_samples

            files = [path for path, _ in foolbox_imagenet_samples()]
            source = "foolbox's ImageNet photos"
        else:
            from .data import iter_image_files

            files, source = iter_image_files([data]), str(data)
        files = files[:max_images] if max_images else files
        images = [Image.open(path) for path in files]
        labels = [_label_from_name(path) for path in files]
        ids = [path.stem for path in files]
    if not images:
        raise ValueError(f"no images found in {source}")
    processor = ImpureImageProcessor(crop_size=image_size, resize_shortest_edge=image_size)
    pixel_values = processor(images)["pixel_values"]
    label_tensor = torch.tensor(labels) if all(label is not None for label in labels) else None
    return EvalImages(pixel_values, label_tensor, ids, source)


def _dataset_images(data: str, split: str, max_images: Optional[int]):
    from .data import load_adversarial_dataset

    dataset = load_adversarial_dataset(data, split=split)
    first: dict = {}
    for row, source in enumerate(dataset["source_id"]):  # each clean image appears once per attack
        first.setdefault(source, row)
    sources = list(first)[:max_images] if max_images else list(first)
    subset = dataset.select([first[s] for s in sources])
    return list(subset["clean"]), list(subset["label"]), [str(s) for s in sources]


# ---------------------------------------------------------------------------------- attacks
def _paper_attack(name: str, model: nn.Module, eps: float, steps: Optional[int], **params):
    from .attacks import make_attack

    attack = make_attack(name, model, eps=eps, **params)
    if steps is not None and hasattr(attack, "steps"):  # one-step attacks (FGSM) keep theirs
        attack = make_attack(name, model, eps=eps, steps=steps, **params)
    return attack


def make_adaptive_attack(name: str, model: nn.Module, eps: float, eot_samples: int = 1, steps: Optional[int] = None):
    """A white-box attack on ``model`` (a defended classifier).

    ``pgd-eot``: torchattacks' EOTPGD with the paper's PGD settings, gradients averaged over
    ``eot_samples`` forward passes. ``autoattack-rand``: AutoAttack's version for randomised
    defences, APGD-CE then APGD-DLR (each image keeps the first that succeeds) with EOT; the
    number of EOT samples is configurable here (AutoAttack fixes 20). Any of the nine attack names:
    that attack on ``model`` as given (wrap it with ``PurifiedClassifier(num_samples=E)`` for EOT on
    averaged logits).
    """
    import torchattacks

    if name == "pgd-eot":
        pgd = _paper_attack("pgd", model, eps, steps)
        return torchattacks.EOTPGD(
            model, eps=pgd.eps, alpha=pgd.alpha, steps=pgd.steps, eot_iter=eot_samples, random_start=pgd.random_start
        )
    if name == "autoattack-rand":
        parts = [_paper_attack(part, model, eps, steps, eot_iter=eot_samples) for part in ("apgd-ce", "apgd-dlr")]
        return torchattacks.MultiAttack(parts)
    return _paper_attack(name, model, eps, steps)


def _attack_settings(name: str, attack, eot_samples: int) -> dict:
    """Threat-model labels of an attack: norm, eps, steps, EOT samples."""
    from .attacks import ATTACK_NORMS

    parts = getattr(attack, "attacks", [attack])
    norm = ATTACK_NORMS.get(name, "Linf" if name in ADAPTIVE_ATTACKS else None)
    eps = getattr(parts[0], "eps", None) if norm == "Linf" else None
    return {
        "norm": norm,
        "eps": eps,
        "eps_255": round(eps * 255, 3) if eps is not None else None,
        "steps": int(getattr(parts[0], "steps", 1)),
        "eot_samples": eot_samples,
    }


def _column_label(name: str, settings: dict, threat_model: Optional[str], eot_samples: int) -> str:
    """Table column of an attack: its name, norm, budget and steps (and EOT samples if white-box)."""
    if name == CLEAN:
        return "clean"
    budget = (
        f"{settings['norm']} {settings['eps_255']:g}/255"
        if settings["eps"] is not None
        else f"{settings['norm']} minimal"
    )
    eot = f", EOT {eot_samples} on random defences" if threat_model == "white-box" else ""
    steps = f"{settings['steps']} step" + ("s" if settings["steps"] != 1 else "")
    return f"{name} ({budget}, {steps}{eot})"


# ---------------------------------------------------------------------------------- helpers
def _seed(*parts) -> int:
    """A stable 31-bit seed from any labels (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _fingerprint(module: Optional[nn.Module]) -> str:
    """A cheap digest of a module's weights, so a retrained model under the same name misses the cache."""
    if module is None:
        return "-"
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().double()
        digest.update(f"{name}{tuple(t.shape)}{t.sum().item():.12e}{t.abs().sum().item():.12e}".encode())
    return digest.hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


@dataclass
class _Defence:
    label: str
    module: Optional[nn.Module]  # None: the classifier alone
    fingerprint: str = "-"

    @property
    def stochastic(self) -> bool:
        return self.module is not None and is_stochastic(self.module)


@dataclass
class _Cell:
    classifier: str
    threat_model: Optional[str]  # None for the clean column
    attack: str
    defence: _Defence
    key: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
        return (
            "__".join(_slug(p) for p in (self.classifier, self.threat_model or CLEAN, self.attack, self.defence.label))
            + f"__{digest}.json"
        )


# ---------------------------------------------------------------------------------- the harness
class _Evaluation:
    """One evaluation run: builds cells, computes the missing ones (sharded), gathers, caches."""

    def __init__(
        self,
        *,
        purifier,
        purifier_name,
        classifiers,
        attacks,
        adaptive_attacks,
        threat_models,
        baselines,
        images,
        eps,
        steps,
        eot_samples,
        num_samples,
        repeats,
        round_adversarial,
        correct_only,
        batch_size,
        seed,
        out_dir,
        device,
        progress,
    ):
        self.state = process_state()
        self.device = torch.device(device) if device is not None else self.state.device
        self.eps = eps
        self.attacks, self.adaptive_attacks, self.threat_models = (
            list(attacks),
            list(adaptive_attacks),
            list(threat_models),
        )
        self.steps, self.eot_samples, self.num_samples, self.repeats = steps, eot_samples, num_samples, repeats
        self.round_adversarial, self.correct_only = round_adversarial, correct_only
        self.batch_size, self.seed, self.images, self.progress = batch_size, seed, images, progress
        self.out_dir = Path(out_dir) if out_dir is not None else None
        for classifier in classifiers:
            if not isinstance(getattr(classifier, "name", None), str):
                raise ValueError(
                    "classifier modules need a .name (wrap them in impure_hf.classifiers.ImageClassifier), "
                    f"got {type(classifier).__name__}"
                )
        self.classifiers = [c.to(self.device).eval() for c in classifiers]
        self.defences = [_Defence(NO_DEFENCE, None)]
        for baseline in baselines:  # a custom purifier module is labelled by its class name
            label = getattr(baseline, "label", None) or type(baseline).__name__
            self.defences.append(_Defence(label, baseline.to(self.device).eval(), _fingerprint(baseline)))
        if purifier is not None:
            self.defences.append(
                _Defence(f"IMPure({purifier_name})", purifier.to(self.device).eval(), _fingerprint(purifier))
            )
        labels = [d.label for d in self.defences]
        if len(set(labels)) != len(labels):
            raise ValueError(f"defence labels must be distinct, got {labels}")
        self.cells: list[dict] = []
        self.selected: dict[str, list[int]] = {}  # per classifier: indices of the evaluated images
        self.predictions: dict[str, torch.Tensor] = {}  # per classifier: clean predictions of all images
        # cache keys: a changed image or retrained model must not reuse old results
        self.pixel_digest = hashlib.sha256(images.pixel_values.numpy().tobytes()).hexdigest()[:16]
        self.classifier_fingerprints = {c.name: _fingerprint(c) for c in self.classifiers}

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    # -------------------------------------------------------------- sharding
    def _batches(self, indices: list[int]) -> list[tuple[int, list[int]]]:
        batches = [(b, indices[i : i + self.batch_size]) for b, i in enumerate(range(0, len(indices), self.batch_size))]
        return batches[self.state.process_index :: self.state.num_processes]

    def _gather(self, local: list) -> list:
        from accelerate.utils import gather_object

        return sorted(gather_object(local), key=lambda item: item[0])

    def _bar(self, iterable, **kwargs):
        from tqdm.auto import tqdm

        return tqdm(iterable, disable=not (self.progress and self.is_main), **kwargs)

    # -------------------------------------------------------------- cache
    def _cell_key(self, classifier, threat_model, attack, defence: _Defence) -> dict:
        return {
            "classifier": classifier.name,
            "classifier_weights": self.classifier_fingerprints[classifier.name],
            "threat_model": threat_model,
            "attack": attack,
            "eps": self.eps,
            "steps": self.steps,
            "eot_samples": self.eot_samples if threat_model == "white-box" else None,
            "defence": defence.label,
            "defence_weights": defence.fingerprint,
            "num_samples": self.num_samples,
            "repeats": self.repeats if defence.stochastic else 1,
            "rounded": self.round_adversarial,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "images": hashlib.sha256(
                json.dumps([self.images.ids[i] for i in self.selected[classifier.name]]).encode()
            ).hexdigest()[:16],
            "pixels": self.pixel_digest,
        }

    def _cached(self, cells: list[_Cell]) -> list[Optional[dict]]:
        """Cached results of ``cells`` (None where missing), decided on the main process for all."""
        from accelerate.utils import broadcast_object_list

        found = [None] * len(cells)
        if self.out_dir is not None and self.is_main:
            for i, cell in enumerate(cells):
                path = self.out_dir / "cells" / cell.path
                if path.exists():
                    try:
                        found[i] = read_json(path)
                    except CorruptFileError as err:  # a cache: recompute it rather than fail
                        warnings.warn(f"{err}: computing the cell again")
        if self.state.num_processes > 1:
            found = broadcast_object_list([found], from_process=0)[0]
        return found

    def _store(self, cell: _Cell, record: dict) -> None:
        if self.out_dir is not None and self.is_main:
            path = self.out_dir / "cells" / cell.path
            atomic_write_json(path, {**record, "key": cell.key})

    def _adversarial_cache(self, classifier: str, attack: str, batch: int, ids: list[str]) -> Optional[Path]:
        if self.out_dir is None:
            return None
        key = json.dumps(
            [
                classifier,
                self.classifier_fingerprints[classifier],
                attack,
                self.eps,
                self.steps,
                self.seed,
                self.round_adversarial,
                ids,
                self.pixel_digest,
            ]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return (
            self.out_dir / "adversarial" / _slug(classifier) / _slug(attack) / f"batch{batch:05d}_{digest}.safetensors"
        )

    # -------------------------------------------------------------- predictions
    @torch.no_grad()
    def _correct(self, defence: _Defence, classifier, images, labels, seeds: list[int]) -> list[list[bool]]:
        """Per repeat, which images the defended classifier gets right."""
        out = []
        for seed in seeds:
            if defence.module is None:
                logits = classifier(images)
            else:
                model = PurifiedClassifier(defence.module, classifier, self.num_samples)
                logits = model(images, generator=_generator(self.device, seed))
            out.append((logits.argmax(dim=-1) == labels).tolist())
        return out

    def _repeat_seeds(self, defence: _Defence, *parts) -> list[int]:
        return [_seed(self.seed, *parts, "purify", r) for r in range(self.repeats if defence.stochastic else 1)]

    def _round(self, adversarial: torch.Tensor, clean: torch.Tensor, norm: Optional[str]) -> torch.Tensor:
        from .attacks import round_to_uint8

        if not self.round_adversarial:
            return adversarial
        # L_inf attacks stay inside their budget after rounding
        return round_to_uint8(adversarial, clean, self.eps) if norm == "Linf" else round_to_uint8(adversarial)

    # -------------------------------------------------------------- the run
    def run(self) -> dict:
        start = time.time()
        for classifier in self.classifiers:
            self._select(classifier)
            self._run_attack(classifier, None, CLEAN)
            if "black-box" in self.threat_models:
                for attack in self._bar(self.attacks, desc=f"{classifier.name} black-box", unit="attack"):
                    self._run_attack(classifier, "black-box", attack)
            if "white-box" in self.threat_models:
                for attack in self._bar(self.adaptive_attacks, desc=f"{classifier.name} white-box", unit="attack"):
                    self._run_attack(classifier, "white-box", attack)
        return {"cells": self.cells, "seconds": time.time() - start}

    def _select(self, classifier) -> None:
        """Indices of the images to evaluate for this classifier (correct clean predictions)."""
        images, labels = self.images.pixel_values, self.images.labels
        local = []
        with torch.no_grad():
            for b, idx in self._batches(list(range(len(images)))):
                local.append((b, classifier(images[idx].to(self.device)).argmax(dim=-1).cpu().tolist()))
        predictions = torch.tensor([p for _, batch in self._gather(local) for p in batch])
        self.predictions[classifier.name] = predictions
        if labels is None:  # unlabelled images: the clean prediction is the label
            self.selected[classifier.name] = list(range(len(images)))
        elif self.correct_only:
            self.selected[classifier.name] = (predictions == labels).nonzero().flatten().tolist()
        else:
            self.selected[classifier.name] = list(range(len(images)))
        if not self.selected[classifier.name]:
            raise ValueError(
                f"{classifier.name} classifies none of the {len(images)} images correctly: nothing to evaluate"
            )

    def _labels(self, classifier, idx: list[int]) -> torch.Tensor:
        labels = self.images.labels if self.images.labels is not None else self.predictions[classifier.name]
        return labels[idx].to(self.device)

    def _run_attack(self, classifier, threat_model: Optional[str], attack: str) -> None:
        """All defences' cells for one attack (black-box: one adversarial set shared by all)."""
        cells = [_Cell(classifier.name, threat_model, attack, d) for d in self.defences]
        for cell in cells:
            cell.key = self._cell_key(classifier, threat_model, attack, cell.defence)
        cached = self._cached(cells)
        todo = [cell for cell, found in zip(cells, cached) if found is None]
        local: dict[str, list] = {cell.defence.label: [] for cell in todo}
        seconds = {cell.defence.label: 0.0 for cell in todo}
        settings: dict[str, dict] = {}
        if todo:
            batches = self._batches(self.selected[classifier.name])
            for b, idx in self._bar(batches, desc=f"{attack}", unit="batch", leave=False):
                images, labels = self.images.pixel_values[idx].to(self.device), self._labels(classifier, idx)
                if threat_model == "white-box":  # one attack per defence, through it
                    for cell in todo:
                        tic, label = time.time(), cell.defence.label
                        adversarial, bare, settings[label] = self._white_box(
                            classifier, attack, cell.defence, images, labels, b
                        )
                        record = self._evaluate_batch(cell.defence, classifier, adversarial, labels, bare, (attack, b))
                        local[label].append((b, record))
                        seconds[label] += time.time() - tic
                else:  # one attack on the classifier, shared by every defence
                    tic = time.time()
                    ids = [self.images.ids[i] for i in idx]
                    adversarial, bare, shared = self._black_box(classifier, attack, images, labels, b, ids)
                    attack_seconds = time.time() - tic
                    for cell in todo:
                        tic, label = time.time(), cell.defence.label
                        settings[label] = shared
                        record = self._evaluate_batch(cell.defence, classifier, adversarial, labels, bare, (attack, b))
                        local[label].append((b, record))
                        seconds[label] += time.time() - tic + attack_seconds / len(todo)
        for cell, found in zip(cells, cached):
            if found is None:
                found = self._assemble(cell, self._gather(local[cell.defence.label]), settings, seconds)
                self._store(cell, found)
            found.pop("key", None)
            self.cells.append(found)

    @torch.no_grad()
    def _bare_correct(self, classifier, adversarial: torch.Tensor, labels: torch.Tensor) -> list[bool]:
        return (classifier(adversarial).argmax(dim=-1) == labels).tolist()

    def _black_box(self, classifier, attack: str, images, labels, batch: int, ids: list[str]):
        """Adversarial images crafted on the classifier alone, rounded if asked (cached per batch).

        Returns the images, which of them the bare classifier gets right before rounding (None for
        clean images) and the attack's settings.
        """
        from .attacks import attack_images

        if attack == CLEAN:
            return images, None, {"norm": None, "eps": None, "eps_255": None, "steps": 0, "eot_samples": None}
        crafted = _paper_attack(attack, classifier, self.eps, self.steps)
        settings = _attack_settings(attack, crafted, 1)
        path = self._adversarial_cache(classifier.name, attack, batch, ids)
        stored = None
        if path is not None and path.exists():
            try:
                stored = load_safetensors(path)
            except CorruptFileError as err:  # a cache: craft the batch again rather than fail
                warnings.warn(f"{err}: crafting the batch again")
        if stored is not None:
            adversarial = stored["adversarial"].to(self.device)
            if adversarial.dtype == torch.uint8:
                adversarial = adversarial.float() / 255
            return adversarial, stored["correct_unrounded"].tolist(), settings
        adversarial = attack_images(crafted, images, labels, seed=_seed(self.seed, classifier.name, attack, batch))
        bare = self._bare_correct(classifier, adversarial, labels)
        adversarial = self._round(adversarial, images, settings["norm"])
        if path is not None:  # 8-bit images are stored exactly, as bytes
            stored = (adversarial * 255).round().to(torch.uint8) if self.round_adversarial else adversarial
            atomic_save_safetensors({"adversarial": stored.contiguous().cpu(), "correct_unrounded": torch.tensor(bare)}, path)
        return adversarial, bare, settings

    def _white_box(self, classifier, attack: str, defence: _Defence, images, labels, batch: int):
        """Adversarial images crafted end to end through the defence, with EOT if it is random.

        Returns what ``_black_box`` returns; the unrounded result only for the bare classifier.
        """
        from .attacks import attack_images

        eot = self.eot_samples if defence.stochastic else 1
        # common random numbers: the attack's own draws do not depend on the defence
        generator = _generator(self.device, _seed(self.seed, classifier.name, attack, batch, "eot"))
        if defence.module is None:
            model = classifier
        else:
            # the nine attacks get EOT by averaging logits; pgd-eot / autoattack-rand average gradients
            samples = 1 if attack in ADAPTIVE_ATTACKS else eot
            model = PurifiedClassifier(defence.module, classifier, samples, generator=generator)
        crafted = make_adaptive_attack(attack, model, self.eps, eot, self.steps)
        seed = _seed(self.seed, classifier.name, attack, batch)
        for part in getattr(crafted, "attacks", []):
            part.seed = seed
        adversarial = attack_images(crafted, images, labels, seed=seed)
        settings = _attack_settings(attack, crafted, eot)
        bare = self._bare_correct(classifier, adversarial, labels) if defence.module is None else None
        return self._round(adversarial, images, settings["norm"]), bare, settings

    def _evaluate_batch(self, defence, classifier, adversarial, labels, bare, seed_parts) -> dict:
        """Which images the defended classifier gets right, per repeat (no defence: also unrounded)."""
        seeds = self._repeat_seeds(defence, classifier.name, *seed_parts)
        record = {"correct": self._correct(defence, classifier, adversarial, labels, seeds)}
        if defence.module is None and bare is not None:
            record["correct_unrounded"] = bare
        return record

    def _assemble(self, cell: _Cell, gathered: list, settings: dict, seconds: dict) -> dict:
        """One table cell from the gathered per-batch records."""
        classifier = cell.classifier
        repeats = len(gathered[0][1]["correct"])
        correct = [[c for _, record in gathered for c in record["correct"][r]] for r in range(repeats)]
        n = len(correct[0])
        accuracies = [100.0 * sum(row) / n for row in correct]
        mean = sum(accuracies) / repeats
        std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (repeats - 1)) if repeats > 1 else 0.0
        # every process holds the settings of the batches it crafted; all are the same per cell
        from accelerate.utils import gather_object

        shared = [s for s in gather_object([settings.get(cell.defence.label)]) if s is not None][0]
        record = {
            "classifier": classifier,
            "threat_model": cell.threat_model,
            "attack": cell.attack,
            "column": _column_label(cell.attack, shared, cell.threat_model, self.eot_samples),
            **shared,
            "defence": cell.defence.label,
            "stochastic": cell.defence.stochastic,
            "num_samples": self.num_samples if cell.defence.stochastic else 1,
            "repeats": repeats,
            "num_images": n,
            "num_images_total": len(self.images.ids),
            "rounded": self.round_adversarial and cell.attack != CLEAN,
            "seed": self.seed,
            "accuracy_mean": mean,
            "accuracy_std": std,
            "accuracies": accuracies,
            "image_ids": [self.images.ids[i] for i in self.selected[classifier]],
            "correct": correct,
            "seconds": sum(gather_object([seconds.get(cell.defence.label, 0.0)])),
        }
        if "correct_unrounded" in gathered[0][1]:
            unrounded = [c for _, r in gathered for c in r["correct_unrounded"]]
            record["accuracy_unrounded"] = 100.0 * sum(unrounded) / n
        return record


# ---------------------------------------------------------------------------------- public API
def _check_settings(attacks, adaptive_attacks, threat_models, eps, steps, **counts) -> float:
    """Fail before any loading on names or numbers that cannot work; returns eps as a float."""
    from .attacks import ATTACKS, check_eps

    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {list(ATTACKS)}")
    unknown = [a for a in adaptive_attacks if a not in ATTACKS and a not in ADAPTIVE_ATTACKS]
    if unknown:
        raise ValueError(f"unknown white-box attack(s) {unknown}; choose from {list(ADAPTIVE_ATTACKS) + list(ATTACKS)}")
    unknown = [t for t in threat_models if t not in THREAT_MODELS]
    if unknown:
        raise ValueError(f"unknown threat model(s) {unknown}; choose from {list(THREAT_MODELS)}")
    if steps is not None:
        counts["steps"] = steps
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return check_eps(eps)


def evaluate(
    purifier: Union[str, nn.Module, None] = None,
    classifiers: Sequence[Union[str, nn.Module]] = ("efficientnet_lite0",),
    attacks: Optional[Sequence[str]] = None,
    adaptive_attacks: Sequence[str] = ADAPTIVE_ATTACKS,
    threat_models: Sequence[str] = ("black-box", "white-box"),
    baselines: Optional[Sequence[Union[str, nn.Module]]] = None,
    data: Union[str, EvalImages, None] = None,
    split: str = "test",
    max_images: Optional[int] = None,
    image_size: Optional[int] = None,
    eps: float = 16 / 255,
    steps: Optional[int] = None,
    eot_samples: int = 8,
    num_samples: int = 1,
    repeats: int = 3,
    round_adversarial: bool = True,
    correct_only: bool = True,
    batch_size: int = 8,
    seed: int = 0,
    out_dir: Union[str, Path, None] = None,
    panels: int = 3,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
) -> dict:
    """Top-1 accuracy of each classifier under each threat model, attack and defence.

    Args:
        purifier: IMPure purifier: an ``ImpureModel``, or a preset name / folder / Hub id
            (``impure_hf.hub.load_purifier``); None evaluates the baselines only.
        classifiers: target classifiers, by name (``impure_hf.classifiers.load_classifier``) or
            as ``ImageClassifier`` modules.
        attacks: black-box attacks (names of ``impure_hf.attacks.ATTACKS``; default: all nine).
        adaptive_attacks: white-box attacks: ``pgd-eot``, ``autoattack-rand`` or any of the nine.
        threat_models: any of ``"black-box"``, ``"white-box"``.
        baselines: baseline purifiers, by spec (``"jpeg"``, ``"harmonic:patch_size=8"``, see
            ``impure_hf.baselines.build_baseline``) or as modules; default ``DEFAULT_BASELINES``.
        data: None (foolbox's 20 labelled ImageNet photos), an image folder, a saved adversarial
            dataset (its distinct clean images of ``split``), or ready ``EvalImages``.
        max_images: use only the first images of ``data``.
        image_size: evaluation resolution (default: the purifier's ``image_size``, else 224).
        eps: L_inf budget in [0, 1] pixel units (the L2 attacks are minimal-perturbation attacks).
        steps: override the attacks' number of steps (one-step attacks keep one).
        eot_samples: EOT samples of the white-box attacks on stochastic defences.
        num_samples: purifications averaged (logits) per prediction by the defended classifier.
        repeats: evaluations of each stochastic defence with fresh randomness (mean and std).
        round_adversarial: round adversarial images to 8 bits before the defence (as stored).
        correct_only: evaluate only images each classifier classifies correctly (the paper).
        batch_size: images per batch; also the unit of data-parallel sharding and of seeding.
        seed: root of every random seed (attacks, purifiers, untrained preset weights).
        out_dir: folder for the cache and the reports (markdown, CSV, JSON, PNG); None: neither.
        panels: images per side-by-side panel (0: no panels).
        device: compute device (default: the process's device under accelerate, else CPU).
        progress: show progress bars on the main process.

    Returns:
        ``{"config": ..., "cells": [...], "seconds": ...}``; each cell holds its labels (threat
        model, attack, norm, eps, steps, EOT samples, defence, number of images, rounding, seed)
        and the accuracy per repeat, their mean and std, and which images were correct.
    """
    from .baselines import DEFAULT_BASELINES, build_baseline
    from .classifiers import load_classifier

    if attacks is None:
        from .attacks import ATTACKS

        attacks = list(ATTACKS)
    baselines = DEFAULT_BASELINES if baselines is None else baselines
    if not isinstance(panels, int) or isinstance(panels, bool) or panels < 0:
        raise ValueError(f"panels must be a non-negative integer (0: no panels), got {panels!r}")
    eps = _check_settings(
        attacks,
        adaptive_attacks,
        threat_models,
        eps,
        steps,
        eot_samples=eot_samples,
        num_samples=num_samples,
        repeats=repeats,
        batch_size=batch_size,
    )
    if isinstance(purifier, str):  # a folder is named by its last component, a preset or Hub id as given
        purifier_name = Path(purifier).name if Path(purifier).exists() else purifier
    else:
        purifier_name = Path(getattr(getattr(purifier, "config", None), "_name_or_path", "")).name or "custom"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # untrained presets get the same weights in every process
        if isinstance(purifier, str):
            from .hub import load_purifier

            purifier = load_purifier(purifier)
    classifier_modules = [load_classifier(c) if isinstance(c, str) else c for c in classifiers]
    baseline_modules = [build_baseline(b) if isinstance(b, str) else b for b in baselines]
    if image_size is None:
        image_size = purifier.config.image_size if purifier is not None and hasattr(purifier, "config") else 224
    images = data if isinstance(data, EvalImages) else load_eval_images(data, split, image_size, max_images)
    run = _Evaluation(
        purifier=purifier,
        purifier_name=purifier_name,
        classifiers=classifier_modules,
        attacks=attacks,
        adaptive_attacks=adaptive_attacks,
        threat_models=threat_models,
        baselines=baseline_modules,
        images=images,
        eps=eps,
        steps=steps,
        eot_samples=eot_samples,
        num_samples=num_samples,
        repeats=repeats,
        round_adversarial=round_adversarial,
        correct_only=correct_only,
        batch_size=batch_size,
        seed=seed,
        out_dir=out_dir,
        device=device,
        progress=progress,
    )
    results = run.run()
    results["config"] = {
        "purifier": next((d.label for d in run.defences if d.label.startswith("IMPure")), None),
        "classifiers": [c.name for c in classifier_modules],
        "attacks": list(attacks),
        "adaptive_attacks": list(adaptive_attacks),
        "threat_models": list(threat_models),
        "defences": [d.label for d in run.defences],
        "data": images.source,
        "num_images_total": len(images.ids),
        "labels": "from data" if images.labels is not None else "clean predictions",
        "image_size": image_size,
        "eps": run.eps,
        "steps": steps,
        "eot_samples": eot_samples,
        "num_samples": num_samples,
        "repeats": repeats,
        "round_adversarial": round_adversarial,
        "correct_only": correct_only,
        "batch_size": batch_size,
        "seed": seed,
        "num_processes": run.state.num_processes,
        "device": str(run.device),
        "versions": _versions(),
    }
    if out_dir is not None and run.is_main:
        write_reports(results, out_dir)
        if panels:
            _write_panels(run, Path(out_dir), panels)
    return results


def _versions() -> dict:
    import torchattacks

    from . import __version__

    return {
        "impure_hf": __version__,
        "torch": torch.__version__,
        "torchattacks": torchattacks.__version__,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------- reports
def _format(cell: dict) -> str:
    if cell["stochastic"] and cell["repeats"] > 1:
        return f"{cell['accuracy_mean']:.1f} ± {cell['accuracy_std']:.1f}"
    return f"{cell['accuracy_mean']:.1f}"


def _tables(results: dict) -> list[tuple[str, str, list[str], list[str], dict]]:
    """(classifier, threat model, column keys, defences, {(defence, column): cell}) per table."""
    cells = results["cells"]
    config = results["config"]
    tables = []
    for classifier in config["classifiers"]:
        for threat_model in config["threat_models"]:
            mine = [c for c in cells if c["classifier"] == classifier and c["threat_model"] in (None, threat_model)]
            columns = list(dict.fromkeys(c["column"] for c in mine))
            lookup = {(c["defence"], c["column"]): c for c in mine}
            if len(columns) > 1:
                tables.append((classifier, threat_model, columns, config["defences"], lookup))
    return tables


def render_markdown(results: dict) -> str:
    """The results as markdown: one table per classifier and threat model (paper Table 2 layout:
    defences by attacks), and, with a purifier and several classifiers, the Table 1 layout."""
    config = results["config"]
    eps_255 = config["eps"] * 255
    lines = [
        "# Evaluation",
        "",
        f"Top-1 accuracy (%) on {config['data']} at {config['image_size']} px; "
        + (
            "only the images each classifier classifies correctly (n below). "
            if config["correct_only"]
            else "all images. "
        )
        + f"L_inf attacks at eps = {eps_255:g}/255; CW and DeepFool are L2 minimal-perturbation attacks. "
        + (
            "Adversarial images rounded to 8 bits before the defence. "
            if config["round_adversarial"]
            else "Adversarial images NOT rounded to 8 bits. "
        )
        + f"Stochastic defences: mean ± std over {config['repeats']} purifications"
        + (f", each averaging {config['num_samples']} samples" if config["num_samples"] > 1 else "")
        + f". Seed {config['seed']}; {config['num_processes']} process(es) on {config['device']}; "
        + f"{sum(c['seconds'] for c in results['cells']):.0f} s of computation ({results['seconds']:.0f} s this run).",
        "",
    ]
    for classifier, threat_model, columns, defences, lookup in _tables(results):
        n = next(iter(lookup.values()))["num_images"]
        lines += [
            f"## {classifier}, {THREAT_MODELS[threat_model]}",
            "",
            f"n = {n} images (of {config['num_images_total']}).",
            "",
        ]
        lines.append("| defence | " + " | ".join(columns) + " |")
        lines.append("|---" * (len(columns) + 1) + "|")
        for defence in defences:
            row = [_format(lookup[(defence, c)]) if (defence, c) in lookup else "" for c in columns]
            lines.append(f"| {defence} | " + " | ".join(row) + " |")
        success = []
        for column in columns:
            bare = lookup.get((NO_DEFENCE, column))
            if bare is None or "accuracy_unrounded" not in bare:
                success.append("–")
            else:
                success.append(f"{100 - bare['accuracy_mean']:.1f} ({100 - bare['accuracy_unrounded']:.1f})")
        lines.append("| attack success on the bare classifier, after (before) rounding | " + " | ".join(success) + " |")
        lines.append("")
    if config["purifier"] and len(config["classifiers"]) > 1:
        lines += _table1(results)
    return "\n".join(lines)


def _table1(results: dict) -> list[str]:
    """Paper Table 1 layout: target classifiers by attacks, with IMPure and without a defence."""
    config = results["config"]
    lines = []
    for threat_model in config["threat_models"]:
        tables = [t for t in _tables(results) if t[1] == threat_model]
        if not tables:
            continue
        columns = tables[0][2]
        lines += [
            f"## Table 1 layout, {THREAT_MODELS[threat_model]}",
            "",
            "| target | " + " | ".join(columns) + " |",
            "|---" * (len(columns) + 1) + "|",
        ]
        for classifier, _, _, _, lookup in tables:
            for defence, suffix in ((config["purifier"], ""), (NO_DEFENCE, ", none")):
                row = [_format(lookup[(defence, c)]) if (defence, c) in lookup else "" for c in columns]
                lines.append(f"| {classifier}{suffix} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


CSV_FIELDS = (
    "classifier",
    "threat_model",
    "attack",
    "norm",
    "eps",
    "eps_255",
    "steps",
    "eot_samples",
    "defence",
    "stochastic",
    "num_samples",
    "repeats",
    "num_images",
    "rounded",
    "seed",
    "accuracy_mean",
    "accuracy_std",
    "accuracy_unrounded",
    "seconds",
)


def write_reports(results: dict, out_dir: Union[str, Path]) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv``, ``results.json`` and ``accuracy.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"results.{name}" for name in ("md", "csv", "json")}
    atomic_write_text(paths["md"], render_markdown(results) + "\n")
    with io.StringIO(newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for cell in results["cells"]:
            writer.writerow({**cell, "threat_model": cell["threat_model"] or "none (clean images)"})
        atomic_write_text(paths["csv"], handle.getvalue())
    atomic_write_json(paths["json"], results, indent=1)
    paths["png"] = _bar_chart(results, out_dir / "accuracy.png")
    return paths


def _bar_chart(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = _tables(results)
    fig, axes = plt.subplots(
        len(tables), 1, figsize=(max(8, 1.3 * max(len(t[2]) for t in tables) * 1.5), 4 * len(tables)), squeeze=False
    )
    for ax, (classifier, threat_model, columns, defences, lookup) in zip(axes[:, 0], tables):
        width = 0.8 / len(defences)
        for d, defence in enumerate(defences):
            cells = [lookup.get((defence, c)) for c in columns]
            xs = [i + (d - (len(defences) - 1) / 2) * width for i in range(len(columns))]
            ax.bar(
                xs,
                [c["accuracy_mean"] if c else 0 for c in cells],
                width,
                yerr=[c["accuracy_std"] if c else 0 for c in cells],
                label=defence,
                capsize=2,
            )
        n = next(iter(lookup.values()))["num_images"]
        ax.set_title(f"{classifier}, {threat_model} (n = {n}, eps {results['config']['eps'] * 255:g}/255)")
        ax.set_xticks(range(len(columns)), [c.replace(" (", "\n(") for c in columns], fontsize=7)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    atomic_save_with(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))
    plt.close(fig)
    return path


def _write_panels(run: _Evaluation, out_dir: Path, count: int) -> None:
    """clean | adversarial | amplified perturbation | purified, for the first black-box images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "black-box" not in run.threat_models or not run.attacks:
        return
    classifier = run.classifiers[0]
    defence = run.defences[-1]  # IMPure when given, else the last baseline
    first = run.selected[classifier.name][: run.batch_size]  # batch 0, whose adversarial images are cached
    images, labels = run.images.pixel_values[first].to(run.device), run._labels(classifier, first)
    ids = [run.images.ids[i] for i in first]
    clean = images[:count]
    names = classifier.labels or [str(i) for i in range(getattr(classifier, "num_classes", 1000))]
    (out_dir / "panels").mkdir(parents=True, exist_ok=True)
    for attack in run.attacks:
        adversarial = run._black_box(classifier, attack, images, labels, 0, ids)[0][:count]
        with torch.no_grad():
            generator = _generator(run.device, _seed(run.seed, "panel"))
            purified = (
                clean if defence.module is None else purified_pixel_values(defence.module, adversarial, generator)
            )
            predictions = [classifier(x).argmax(dim=-1).tolist() for x in (clean, adversarial, purified)]
        amplified, _ = amplified_perturbation(clean, adversarial)
        fig, axes = plt.subplots(len(clean), 4, figsize=(12, 3.2 * len(clean)), squeeze=False)
        for row in range(len(clean)):
            columns = (
                (clean, f"clean: {names[predictions[0][row]][:28]}"),
                (adversarial, f"{attack}: {names[predictions[1][row]][:28]}"),
                (amplified, "perturbation (amplified)"),
                (purified, f"{defence.label[:24]}: {names[predictions[2][row]][:20]}"),
            )
            for ax, (shown, title) in zip(axes[row], columns):
                ax.imshow(shown[row].permute(1, 2, 0).cpu().numpy())
                ax.set_title(title, fontsize=8)
                ax.axis("off")
        fig.tight_layout()
        atomic_save_with(
            out_dir / "panels" / f"{_slug(classifier.name)}_{_slug(attack)}.png",
            lambda temporary: fig.savefig(temporary, dpi=72, format="png"),
        )
        plt.close(fig)


# ---------------------------------------------------------------------------------- CLI
def _run_cli(args) -> int:
    from . import DEFAULT_MODEL

    purifier = None if args.no_purifier else args.purifier or DEFAULT_MODEL
    if purifier == DEFAULT_MODEL and not (Path(DEFAULT_MODEL) / "config.json").exists():
        print(
            f"error: no embedded default model in this installation ({DEFAULT_MODEL}); pass --purifier "
            "NAME|FOLDER|HUB_ID, or --no-purifier to evaluate the baselines only",
            file=sys.stderr,
        )
        return 2
    try:
        results = _evaluate_from_args(args, purifier)
    except (ValueError, FileNotFoundError) as err:  # bad names, settings or data: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if process_state().is_main_process:
        print(render_markdown(results))
        panels = ", panels/" if args.panels and (Path(args.out) / "panels").is_dir() else ""  # --panels 0 writes none
        print(f"\nwrote {Path(args.out) / 'results.md'}, results.csv, results.json, accuracy.png{panels}")
    return 0


def _evaluate_from_args(args, purifier: Optional[str]) -> dict:
    return evaluate(
        purifier=purifier,
        classifiers=args.classifiers,
        attacks=args.attacks,
        adaptive_attacks=args.adaptive_attacks,
        threat_models=args.threat_models,
        baselines=[] if args.baselines == ["none"] else args.baselines,
        data=args.data,
        split=args.split,
        max_images=args.max_images,
        image_size=args.image_size,
        eps=args.eps,
        steps=args.steps,
        eot_samples=args.eot_samples,
        num_samples=args.num_samples,
        repeats=args.repeats,
        round_adversarial=not args.no_round,
        correct_only=not args.all_images,
        batch_size=args.batch_size,
        seed=args.seed,
        out_dir=args.out,
        panels=args.panels,
        device=args.device,
    )


def add_parser(subparsers) -> None:
    """Register ``impure evaluate``."""
    from .baselines import DEFAULT_BASELINES
    from .data import parse_eps

    parser = subparsers.add_parser(
        "evaluate",
        help="accuracy tables: no defence, baselines and IMPure under black-box and white-box attacks",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--purifier", default=None, help="preset name, saved folder or Hub id (default: the embedded model)"
    )
    parser.add_argument("--no-purifier", action="store_true", help="evaluate the baselines only")
    parser.add_argument("--classifiers", nargs="+", default=["efficientnet_lite0"], help="target classifier names")
    parser.add_argument("--attacks", nargs="+", default=None, help="black-box attacks (default: the nine of the paper)")
    parser.add_argument(
        "--adaptive-attacks",
        nargs="+",
        default=list(ADAPTIVE_ATTACKS),
        help="white-box attacks: pgd-eot, autoattack-rand or any of the nine",
    )
    parser.add_argument("--threat-models", nargs="+", default=["black-box", "white-box"], choices=list(THREAT_MODELS))
    parser.add_argument(
        "--baselines",
        nargs="+",
        default=list(DEFAULT_BASELINES),
        help="baseline specs, e.g. jpeg:quality=50 harmonic:patch_size=8; 'none' for none",
    )
    parser.add_argument(
        "--data", default=None, help="image folder or saved adversarial dataset (default: foolbox's 20 ImageNet photos)"
    )
    parser.add_argument("--split", default="test", help="dataset split")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None, help="default: the purifier's image_size, else 224")
    parser.add_argument("--eps", type=parse_eps, default=16 / 255, help="L_inf budget, e.g. 16/255 or 0.03")
    parser.add_argument("--steps", type=int, default=None, help="override the attacks' number of steps")
    parser.add_argument(
        "--eot-samples", type=int, default=8, help="EOT samples of white-box attacks on stochastic defences"
    )
    parser.add_argument("--num-samples", type=int, default=1, help="purifications averaged per prediction")
    parser.add_argument("--repeats", type=int, default=3, help="evaluations of each stochastic defence (mean ± std)")
    parser.add_argument(
        "--no-round", action="store_true", help="do not round adversarial images to 8 bits before the defence"
    )
    parser.add_argument("--all-images", action="store_true", help="also evaluate images the classifier gets wrong")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder (reports and the resumable cache)")
    parser.add_argument("--panels", type=int, default=3, help="images per side-by-side panel (0: none)")
    parser.add_argument("--device", default=None, help="default: the process's accelerate device")
    parser.set_defaults(func=_run_cli)


__all__ = [
    "ADAPTIVE_ATTACKS",
    "THREAT_MODELS",
    "EvalImages",
    "PurifiedClassifier",
    "evaluate",
    "is_stochastic",
    "load_eval_images",
    "make_adaptive_attack",
    "purified_pixel_values",
    "render_markdown",
    "write_reports",
]
