"""Reports of an evaluation: markdown tables, CSV, JSON, a bar chart and image panels.

Reads the results ``evaluate`` returns (and, for the panels, its finished run); imports nothing of
the harness, so the reports can be rendered again from a saved ``results.json``.
"""

from __future__ import annotations

import csv
import io
import platform
import re
from pathlib import Path
from typing import Union

import torch
from matplotlib.figure import Figure

from .._utils import atomic_save_with, atomic_write_json, atomic_write_text
from .._version import __version__
from ..attacks import torchattacks
from ..defended import amplified_perturbation, purified_pixel_values
from .settings import NO_DEFENCE, THREAT_MODELS, _generator, _seed

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def _versions() -> dict:

    return {
        "impure_hf": __version__,
        "torch": torch.__version__,
        "torchattacks": torchattacks.__version__,
        "python": platform.python_version(),
    }


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
    tables = _tables(results)
    # no pyplot: files only, the user's backend untouched
    fig = Figure(figsize=(max(8, 1.3 * max(len(t[2]) for t in tables) * 1.5), 4 * len(tables)))
    axes = fig.subplots(len(tables), 1, squeeze=False)
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
    return path


def _write_panels(run, out_dir: Path, count: int) -> None:
    """clean | adversarial | amplified perturbation | purified, for the first black-box images of
    ``run`` (the harness's finished run, read by attribute: this module does not import the harness)."""
    if "black-box" not in run.settings.threat_models or not run.settings.attacks:
        return
    classifier = run.classifiers[0]
    defence = run.defences[-1]  # IMPure when given, else the last baseline
    first = run.selected[classifier.name][: run.settings.batch_size]  # batch 0, whose adversarial images are cached
    images, labels = run.images.pixel_values[first].to(run.device), run._labels(classifier, first)
    ids = [run.images.ids[i] for i in first]
    clean = images[:count]
    names = classifier.labels or [str(i) for i in range(getattr(classifier, "num_classes", 1000))]
    (out_dir / "panels").mkdir(parents=True, exist_ok=True)
    for attack in run.settings.attacks:
        adversarial = run._black_box(classifier, attack, images, labels, 0, ids)[0][:count]
        with torch.no_grad():
            generator = _generator(run.device, _seed(run.settings.seed, "panel"))
            purified = (
                clean if defence.module is None else purified_pixel_values(defence.module, adversarial, generator)
            )
            predictions = [classifier(x).argmax(dim=-1).tolist() for x in (clean, adversarial, purified)]
        amplified, _ = amplified_perturbation(clean, adversarial)
        fig = Figure(figsize=(12, 3.2 * len(clean)))
        axes = fig.subplots(len(clean), 4, squeeze=False)
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


__all__ = ["CSV_FIELDS", "render_markdown", "write_reports"]
