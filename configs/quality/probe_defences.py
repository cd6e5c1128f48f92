"""Issue #22 probe: which reconstruction of an *attacked* photo keeps the classifier's answer, and can a
noise estimate tell attacked photos from clean ones?

Reads the black-box adversarial images that ``impure evaluate --out OUT/seedS`` cached (so every
defence sees the very images the evaluation table used) and scores non-learned defences on them,
plus "detector-gated" versions: identity when the photo's estimated noise level (wavelet MAD,
``skimage.restoration.estimate_sigma``) is below a threshold, the defence otherwise. No training,
no foolbox photos: run it on the validation folder only.

    python configs/quality/probe_defences.py --data runs/validation --evals runs/valeval --seeds 0 1 2 3 \
        --calibration $(python -c "from impure_hf.data import OFFLINE_PHOTOS, package_file; \
            print(*(package_file(n) for n in OFFLINE_PHOTOS['train']))") \
            $(sh configs/quality/photos.sh configs/quality/train_photos.txt) --out runs/probe

The gate's threshold is a quantile (--quantile) of the noise estimates of the --calibration photos (clean training photos,
framed as the evaluation frames them), so nothing of the validation or test photos sets it. --purifiers adds
IMPure purifiers (saved folders or presets, 'folder@IMG,FEA' for fixed noise steps) as defences
(--chain-tv: also with TV after them).
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage.restoration import estimate_sigma

from impure_hf.baselines import build_baseline
from impure_hf.classifiers import load_classifier
from impure_hf.evaluation.images import load_eval_images
from impure_hf.image_processing_impure import ImpureImageProcessor
from impure_hf.layers_impure import HarmonicPatchFill
from impure_hf.loading import load_purifier
from impure_hf.modeling_impure import ImpureNoise

ATTACKS = ("fgsm", "pgd", "mifgsm")


def noise_level(images: torch.Tensor) -> np.ndarray:
    """Per image, the mean over channels of the wavelet-MAD noise estimate (pixels in [0, 1])."""
    return np.array([np.mean(estimate_sigma(im.permute(1, 2, 0).numpy(), channel_axis=-1)) for im in images])


def adversarial_images(eval_dir: Path, attack: str) -> torch.Tensor:
    files = sorted((eval_dir / "adversarial").glob(f"*/{attack}/batch*.safetensors"),
                   key=lambda p: int(re.search(r"batch(\d+)", p.name).group(1)))
    if not files:
        raise FileNotFoundError(f"no cached {attack} images under {eval_dir}/adversarial")
    out = torch.cat([load_file(f)["adversarial"] for f in files])
    return out.float() / 255 if out.dtype == torch.uint8 else out


class FillShrink(torch.nn.Module):
    """Harmonic fill from the other patches plus the own patch's residual, soft-thresholded at k * sigma."""

    def __init__(self, patch_size: int, k: float):
        super().__init__()
        self.fill, self.k = HarmonicPatchFill(patch_size), k

    def forward(self, images, generator=None):
        fill = self.fill(images)
        sigma = torch.tensor(noise_level(images), dtype=images.dtype).view(-1, 1, 1, 1)
        residual = images - fill
        shrunk = residual.sign() * (residual.abs() - self.k * sigma).clamp_min(0)
        return (fill + shrunk).clamp(0, 1)


class Chain(torch.nn.Module):
    def __init__(self, *stages):
        super().__init__()
        self.stages = torch.nn.ModuleList(stages)

    def forward(self, images, generator=None):
        for stage in self.stages:
            images = stage(images, generator=generator)
        return images


class Purify(torch.nn.Module):
    """An IMPure purifier as a defence of pixel images in [0, 1], optionally at fixed noise steps.

    ``steps`` = (image-noise step, feature-noise step) replaces the config's evaluation steps.
    """

    def __init__(self, model, steps: tuple[int, int] | None = None):
        super().__init__()
        self.model, self.steps = model.eval(), steps

    def forward(self, images, generator=None):
        noise = None
        if self.steps is not None:
            n, subsets = images.shape[0], self.model.config.num_subsets
            noise = ImpureNoise(image_noise_step=torch.full((n,), self.steps[0], dtype=torch.long),
                                feature_noise_step=torch.full((n, subsets), self.steps[1], dtype=torch.long))
        return self.model.purify(images, generator=generator, noise=noise).clamp(0, 1)


def purifier_spec(spec: str) -> tuple[str, tuple[int, int] | None]:
    """'folder' or 'folder@IMG,FEA' (noise steps)."""
    if "@" not in spec:
        return spec, None
    name, steps = spec.rsplit("@", 1)
    img, fea = (int(v) for v in steps.split(","))
    return name, (img, fea)


def defences(purifiers: list[str], only: list[str] | None, chain_tv: bool) -> dict:
    out = {name: build_baseline(name) for name in ("tv", "wavelet", "median")}
    out.update({f"tv:weight={w}": build_baseline(f"tv:weight={w}") for w in (0.2, 0.3, 0.5)})
    out.update({f"harmonic:patch_size={p}": build_baseline(f"harmonic:patch_size={p}") for p in (2, 4, 8)})
    out.update({f"fill{p}+shrink{k}": FillShrink(p, k) for p in (4, 8) for k in (1.0, 2.0)})
    loaded = {}
    for spec in purifiers:
        name, steps = purifier_spec(spec)
        loaded.setdefault(name, load_purifier(name))
        model = Purify(loaded[name], steps)
        out[spec] = model
        if chain_tv:
            out[f"{spec} -> tv"] = Chain(model, build_baseline("tv"))
    return {k: v for k, v in out.items() if only is None or k in only or k.startswith(tuple(purifiers))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--evals", required=True, help="folder with seedS/ outputs of impure evaluate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--calibration", nargs="+", required=True, help="clean photos that set the gate's threshold")
    parser.add_argument("--quantile", type=float, default=0.9, help="threshold: this quantile of the calibration estimates")
    parser.add_argument("--purifiers", nargs="*", default=[], help="IMPure purifiers (folders or presets) to add")
    parser.add_argument("--only", nargs="*", default=None, help="keep only these non-IMPure defences")
    parser.add_argument("--chain-tv", action="store_true", help="also each IMPure purifier followed by TV")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    classifier = load_classifier("efficientnet_lite0").eval()
    clean = load_eval_images(args.data, image_size=224).pixel_values
    labels = classifier(clean).argmax(-1)
    sets = {"clean": {s: clean for s in args.seeds}}
    for attack in ATTACKS:
        sets[attack] = {s: adversarial_images(Path(args.evals) / f"seed{s}", attack) for s in args.seeds}

    # 1. can a noise estimate tell them apart?
    sigma = {name: {s: noise_level(x) for s, x in per_seed.items()} for name, per_seed in sets.items()}
    lines = ["| images | noise estimate: min / median / max (x255) |", "|---|---|"]
    for name, per_seed in sigma.items():
        v = np.concatenate(list(per_seed.values())) * 255
        lines.append(f"| {name} | {v.min():.2f} / {np.median(v):.2f} / {v.max():.2f} |")
    processor = ImpureImageProcessor(crop_size=224)
    calibration = noise_level(processor([Image.open(f).convert("RGB") for f in args.calibration])["pixel_values"])
    threshold = float(np.quantile(calibration, args.quantile))
    lines.append(f"\nGate threshold: the {args.quantile:g} quantile of the {len(calibration)} calibration photos' estimates, "
                 f"{threshold * 255:.2f}/255.")

    # 2. counts of photos kept/restored per defence, with and without the gate
    rows = []
    for dname, defence in defences(args.purifiers, args.only, args.chain_tv).items():
        counts = {False: {}, True: {}}
        for name, per_seed in sets.items():
            counts[False][name], counts[True][name] = [], []
            for s, x in per_seed.items():
                purified = defence(x, generator=torch.Generator().manual_seed(s))
                on = torch.tensor(sigma[name][s] > threshold).view(-1, 1, 1, 1)
                for gated, image in ((False, purified), (True, torch.where(on, purified, x))):
                    counts[gated][name].append(int((classifier(image).argmax(-1) == labels).sum()))
        for gated in (False, True):
            label = f"gate>{threshold * 255:.1f} -> {dname}" if gated else dname
            rows.append([label] + [f"{np.mean(c):.2f} ± {np.std(c, ddof=1) if len(c) > 1 else 0:.2f} {tuple(c)}"
                                   for c in counts[gated].values()])
            print(rows[-1], flush=True)
    header = ["defence", *sets]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    (out / "probe.md").write_text("\n".join(lines) + "\n")
    with open(out / "probe.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
