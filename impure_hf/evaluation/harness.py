"""The evaluation harness: the paper's tables, the baselines in the same loop, and white-box adaptive attacks.

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

Python: ``evaluate(purifier="impure-vit-tiny", attacks=["pgd"], out_dir="eval")`` (settings:
[`EvalSettings`]). CLI: ``impure evaluate --purifier NAME --attacks pgd fgsm --out eval``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn
from tqdm.auto import tqdm

from .._utils import CorruptFileError, atomic_save_safetensors, atomic_write_json, load_safetensors, process_state, read_json
from ..attacks import ADAPTIVE_ATTACKS, ATTACK_NORMS, paper_attack, attack_images, make_adaptive_attack, round_to_uint8
from ..baselines import build_baseline
from ..classifiers import load_classifier
from ..defended import PurifiedClassifier, is_stochastic
from ..loading import load_purifier
from ..precision import set_precision
from .images import EvalImages, load_eval_images
from .reports import _slug, _versions, _write_panels, write_reports
from .settings import CLEAN, NO_DEFENCE, EvalSettings, _generator, _seed, no_baseline_if_none


# ---------------------------------------------------------------------------------- attack labels
def _attack_settings(name: str, attack, eot_samples: int) -> dict:
    """Threat-model labels of an attack: norm, eps, steps, EOT samples."""
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
def _fingerprint(module: Optional[nn.Module]) -> str:
    """A cheap digest of a module's weights, so a retrained model under the same name misses the cache."""
    if module is None:
        return "-"
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().double()
        digest.update(f"{name}{tuple(t.shape)}{t.sum().item():.12e}{t.abs().sum().item():.12e}".encode())
    return digest.hexdigest()[:16]


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

    def __init__(self, settings: EvalSettings, *, purifier, purifier_name, classifiers, baselines, images):
        self.settings = settings  # checked: attacks resolved, eps a float
        self.state = process_state()
        self.device = torch.device(settings.device) if settings.device is not None else self.state.device
        self.images = images
        self.out_dir = Path(settings.out_dir) if settings.out_dir is not None else None
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
        batches = [(b, indices[i : i + self.settings.batch_size]) for b, i in enumerate(range(0, len(indices), self.settings.batch_size))]
        return batches[self.state.process_index :: self.state.num_processes]

    def _gather(self, local: list) -> list:
        return sorted(gather_object(local), key=lambda item: item[0])

    def _bar(self, iterable, **kwargs):
        return tqdm(iterable, disable=not (self.settings.progress and self.is_main), **kwargs)

    # -------------------------------------------------------------- cache
    def _cell_key(self, classifier, threat_model, attack, defence: _Defence) -> dict:
        return {
            "classifier": classifier.name,
            "classifier_weights": self.classifier_fingerprints[classifier.name],
            "threat_model": threat_model,
            "attack": attack,
            "defence": defence.label,
            "defence_weights": defence.fingerprint,
            **self.settings.cell_key(white_box=threat_model == "white-box", stochastic=defence.stochastic),
            "images": hashlib.sha256(
                json.dumps([self.images.ids[i] for i in self.selected[classifier.name]]).encode()
            ).hexdigest()[:16],
            "pixels": self.pixel_digest,
        }

    def _cached(self, cells: list[_Cell]) -> list[Optional[dict]]:
        """Cached results of ``cells`` (None where missing), decided on the main process for all."""
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
        key = json.dumps([classifier, self.classifier_fingerprints[classifier], attack,
                          *self.settings.adversarial_key(), ids, self.pixel_digest])
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
                model = PurifiedClassifier(defence.module, classifier, self.settings.num_samples)
                logits = model(images, generator=_generator(self.device, seed))
            out.append((logits.argmax(dim=-1) == labels).tolist())
        return out

    def _repeat_seeds(self, defence: _Defence, *parts) -> list[int]:
        return [_seed(self.settings.seed, *parts, "purify", r) for r in range(self.settings.repeats if defence.stochastic else 1)]

    def _round(self, adversarial: torch.Tensor, clean: torch.Tensor, norm: Optional[str]) -> torch.Tensor:
        if not self.settings.round_adversarial:
            return adversarial
        # L_inf attacks stay inside their budget after rounding
        return round_to_uint8(adversarial, clean, self.settings.eps) if norm == "Linf" else round_to_uint8(adversarial)

    # -------------------------------------------------------------- the run
    def run(self) -> dict:
        start = time.time()
        for classifier in self.classifiers:
            self._select(classifier)
            self._run_attack(classifier, None, CLEAN)
            if "black-box" in self.settings.threat_models:
                for attack in self._bar(self.settings.attacks, desc=f"{classifier.name} black-box", unit="attack"):
                    self._run_attack(classifier, "black-box", attack)
            if "white-box" in self.settings.threat_models:
                for attack in self._bar(self.settings.adaptive_attacks, desc=f"{classifier.name} white-box", unit="attack"):
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
        elif self.settings.correct_only:
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

        if attack == CLEAN:
            return images, None, {"norm": None, "eps": None, "eps_255": None, "steps": 0, "eot_samples": None}
        crafted = paper_attack(attack, classifier, self.settings.eps, self.settings.steps)
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
        adversarial = attack_images(crafted, images, labels, seed=_seed(self.settings.seed, classifier.name, attack, batch))
        bare = self._bare_correct(classifier, adversarial, labels)
        adversarial = self._round(adversarial, images, settings["norm"])
        if path is not None:  # 8-bit images are stored exactly, as bytes
            stored = (adversarial * 255).round().to(torch.uint8) if self.settings.round_adversarial else adversarial
            atomic_save_safetensors({"adversarial": stored.contiguous().cpu(), "correct_unrounded": torch.tensor(bare)}, path)
        return adversarial, bare, settings

    def _white_box(self, classifier, attack: str, defence: _Defence, images, labels, batch: int):
        """Adversarial images crafted end to end through the defence, with EOT if it is random.

        Returns what ``_black_box`` returns; the unrounded result only for the bare classifier.
        """
        eot = self.settings.eot_samples if defence.stochastic else 1
        # common random numbers: the attack's own draws do not depend on the defence
        generator = _generator(self.device, _seed(self.settings.seed, classifier.name, attack, batch, "eot"))
        if defence.module is None:
            model = classifier
        else:
            # the nine attacks get EOT by averaging logits; pgd-eot / autoattack-rand average gradients
            samples = 1 if attack in ADAPTIVE_ATTACKS else eot
            model = PurifiedClassifier(defence.module, classifier, samples, generator=generator)
        crafted = make_adaptive_attack(attack, model, self.settings.eps, eot, self.settings.steps)
        seed = _seed(self.settings.seed, classifier.name, attack, batch)
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
        shared = [s for s in gather_object([settings.get(cell.defence.label)]) if s is not None][0]
        record = {
            "classifier": classifier,
            "threat_model": cell.threat_model,
            "attack": cell.attack,
            "column": _column_label(cell.attack, shared, cell.threat_model, self.settings.eot_samples),
            **shared,
            "defence": cell.defence.label,
            "stochastic": cell.defence.stochastic,
            "num_samples": self.settings.num_samples if cell.defence.stochastic else 1,
            "repeats": repeats,
            "num_images": n,
            "num_images_total": len(self.images.ids),
            "rounded": self.settings.round_adversarial and cell.attack != CLEAN,
            "seed": self.settings.seed,
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


# ---------------------------------------------------------------------------------- the function
def evaluate(
    purifier: Union[str, nn.Module, None] = None,
    classifiers: Optional[Sequence[Union[str, nn.Module]]] = None,
    baselines: Optional[Sequence[Union[str, nn.Module]]] = None,
    data: Union[str, EvalImages, None] = None,
    settings: Optional[EvalSettings] = None,
    **options,
) -> dict:
    """Top-1 accuracy of each classifier under each threat model, attack and defence.

    Args:
        purifier: IMPure purifier: an ``ImpureModel``, or a preset name / folder / Hub id
            (``impure_hf.load_purifier``); None: ``settings.purifier`` (None evaluates the
            baselines only).
        classifiers: target classifiers, by name (``impure_hf.classifiers.load_classifier``) or
            as ``ImageClassifier`` modules; None: ``settings.classifiers``.
        baselines: baseline purifiers, by spec (``"jpeg"``, ``"harmonic:patch_size=8"``, see
            ``impure_hf.baselines.build_baseline``) or as modules; None: ``settings.baselines``.
        data: None (``settings.data``; default foolbox's 20 labelled ImageNet photos), an image
            folder, a saved adversarial dataset (its distinct clean images of ``split``), or ready
            ``EvalImages``.
        settings: an [`EvalSettings`] (default: its defaults).
        **options: any ``EvalSettings`` field, overriding ``settings`` (e.g. ``attacks=["pgd"]``,
            ``eps=8/255``, ``out_dir="eval"``); an unknown name raises a TypeError.

    Returns:
        ``{"config": ..., "cells": [...], "seconds": ...}``; each cell holds its labels (threat
        model, attack, norm, eps, steps, EOT samples, defence, number of images, rounding, seed)
        and the accuracy per repeat, their mean and std, and which images were correct;
        ``config`` holds the settings and what they resolved to.
    """
    settings = dataclasses.replace(settings or EvalSettings(), **options).checked()
    purifier = settings.purifier if purifier is None else purifier
    classifiers = settings.classifiers if classifiers is None else classifiers
    baselines = settings.baselines if baselines is None else no_baseline_if_none(baselines)
    data = settings.data if data is None else data
    if isinstance(purifier, str):  # a folder is named by its last component, a preset or Hub id as given
        purifier_name = Path(purifier).name if Path(purifier).exists() else purifier
    else:
        purifier_name = Path(getattr(getattr(purifier, "config", None), "_name_or_path", "")).name or "custom"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)  # untrained presets get the same weights in every process
        if isinstance(purifier, str):
            purifier = load_purifier(purifier)
    if hasattr(purifier, "autocast_dtype"):  # an ImpureModel: its precision (auto resolves to what was measured)
        choice = set_precision(purifier, settings.dtype)
        settings = dataclasses.replace(settings, dtype=choice.dtype)
        if settings.dtype != "fp32" or choice.reason != "requested":
            print(choice, flush=True)
    classifier_modules = [load_classifier(c) if isinstance(c, str) else c for c in classifiers]
    baseline_modules = [build_baseline(b) if isinstance(b, str) else b for b in baselines]
    image_size = settings.image_size
    if image_size is None:
        image_size = purifier.config.image_size if purifier is not None and hasattr(purifier, "config") else 224
    if isinstance(data, EvalImages):
        images = data
    else:
        images = load_eval_images(data, settings.split, image_size, settings.max_images)
    run = _Evaluation(settings, purifier=purifier, purifier_name=purifier_name, classifiers=classifier_modules,
                      baselines=baseline_modules, images=images)
    results = run.run()
    results["config"] = {
        **settings.to_dict(),
        # what the settings resolved to
        "purifier": next((d.label for d in run.defences if d.label.startswith("IMPure")), None),
        "classifiers": [c.name for c in classifier_modules],
        "defences": [d.label for d in run.defences],
        "data": images.source,
        "num_images_total": len(images.ids),
        "labels": "from data" if images.labels is not None else "clean predictions",
        "image_size": image_size,
        "num_processes": run.state.num_processes,
        "device": str(run.device),
        "versions": _versions(),
    }
    if settings.out_dir is not None and run.is_main:
        write_reports(results, settings.out_dir)
        if settings.panels:
            _write_panels(run, Path(settings.out_dir), settings.panels)
    return results


__all__ = ["evaluate"]
