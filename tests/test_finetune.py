"""Fine-tuning for a custom classifier: held-out improvement, frozen encoder, declared normalisation
and clear mismatch errors, pairs that follow the classifier's labels (in memory, image folder,
offline builder), the `impure finetune` command, and the transformers pipeline wrapper.

The target is the README example's real classifier with a non-ImageNet label set: EfficientNet-Lite0
(real ImageNet weights) with a 10-class CIFAR-10 head, fed 32 px images directly (cheap on a CPU).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from impure_hf import ImpureModel
from impure_hf.classifiers import ImageClassifier
from impure_hf.data import OFFLINE_PHOTOS, load_adversarial_dataset, package_file
from impure_hf.data import class_indices
from impure_hf.defended import PurifiedImageClassification, purified_pipeline
from impure_hf.finetuning import build_finetuning_dataset, finetune
from impure_hf.image_processing_impure import ImpureImageProcessor
from impure_hf.train import encoder_parameters, validation_metrics

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("finetune_cifar10", ROOT / "examples" / "finetune_cifar10.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example()
# the un-fine-tuned starting point: a tiny 32 px purifier trained without any classifier
BASE = EXAMPLE.BASE_PURIFIER
photo_crops = EXAMPLE.photo_crops  # random crops of the offline train / validation photos (disjoint)


@pytest.fixture(scope="module")
def cifar10() -> ImageClassifier:
    return EXAMPLE.cifar10_classifier(input_size=32)


def offline_pairs(classifier, folder, train_size: int, seed: int = 0, **kwargs):
    """Adversarial train pairs of random crops of the offline photos, through the one dataset builder."""
    return build_finetuning_dataset(classifier, "offline", folder, image_size=32, train_size=train_size, validation_size=1,
                                    seed=seed, progress=False, **kwargs)["train"]


@pytest.fixture(scope="module")
def train_pairs(cifar10, tmp_path_factory):
    return offline_pairs(cifar10, tmp_path_factory.mktemp("pairs"), 64, attacks=["pgd"], eps=8 / 255)


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def common(tmp_path, name: str) -> dict:
    return dict(output_dir=str(tmp_path / name), report_to="none", logging_steps=10**6, save_steps=10**6, total_limit=1, seed=0)


# ---------------------------------------------------------------------------------- improvement
@pytest.mark.slow
def test_finetuning_improves_purified_accuracy_for_a_10_class_classifier(tmp_path, cifar10, train_pairs):
    from impure_hf import PurifiedClassifier
    from impure_hf.data import to_tensors

    # held out: other random crops (seed 1, not 0) of the training photos, never trained on
    held_out = offline_pairs(cifar10, tmp_path / "held-out", 64, seed=1, attacks=["pgd"], eps=8 / 255)
    assert train_pairs.features["label"].names == EXAMPLE.CIFAR10_LABELS == held_out.features["label"].names
    adversarial, labels = torch.stack(to_tensors(held_out[:])["adversarial"]), torch.tensor(held_out["label"])
    assert len(labels) == 64  # labels are the clean predictions: every image is attacked

    @torch.no_grad()
    def top1(purifier) -> float:  # over four draws of the purifier's noise: 256 predictions
        defended = PurifiedClassifier(purifier.eval(), cifar10)
        seeds = [torch.Generator().manual_seed(s) for s in range(4)]
        return float(np.mean([(defended(adversarial, generator=g).argmax(dim=1) == labels).float().mean() for g in seeds]))

    settings = dict(max_steps=120, batch_size=16, learning_rate=1e-3, warmup_steps=5)
    before = top1(ImpureModel.from_pretrained(BASE))
    tuned = finetune(ImpureModel.from_pretrained(BASE), cifar10, train_pairs, **settings, **common(tmp_path, "tuned"))
    # control: the same steps without the classifier's perceptual loss (pixel L1 only)
    control = finetune(ImpureModel.from_pretrained(BASE), cifar10, train_pairs, perceptual_loss="none", **settings,
                       **common(tmp_path, "control"))
    after, after_control = top1(tuned), top1(control)
    # measured: 0.31 before, 0.39 after, 0.31 for the control at 1 thread; at 2 threads (other training
    # numerics) the control reached 0.36 against 0.38: the margin over the control holds at both only
    # as a smaller one
    assert after >= before + 0.03, (before, after)
    assert after >= after_control + 0.01, (after_control, after)


# ---------------------------------------------------------------------------------- frozen encoder
def test_frozen_encoder_and_declared_normalisation(tmp_path, cifar10, train_pairs):
    seen = []  # what the network itself receives
    hook = cifar10.model.conv_stem.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model = tiny_model()
    start = parameters(model)
    try:
        tuned = finetune(model, cifar10, train_pairs, freeze_encoder=True, max_steps=2, batch_size=4, **common(tmp_path, "frozen"))
    finally:
        hook.remove()
    encoder = dict(encoder_parameters(tuned))
    assert len(encoder) > 10 and all(torch.equal(p, start[n]) for n, p in encoder.items())
    changed = [n for n, p in parameters(tuned).items() if not torch.equal(p, start[n])]
    assert changed and all(n.startswith("decoder_") for n in changed)

    # the perceptual loss's target pass feeds the clean images normalised exactly once, by the
    # mean / std declared in ImageClassifier (0.5 / 0.5), in every training step
    clean = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in train_pairs["clean"]])
    normalised = (clean - 0.5) / 0.5

    def is_normalised_clean(batch: torch.Tensor) -> bool:
        distance = (batch[:, None] - normalised[None]).abs().flatten(2).amax(dim=-1)  # (B, N)
        return bool((distance.min(dim=1).values < 1e-5).all())

    assert sum(is_normalised_clean(batch) for batch in seen) >= 2


# ---------------------------------------------------------------------------------- clear errors
class Net32(nn.Module):
    """A CIFAR-style network with a fixed 32 x 32 input (its linear layer fixes the size)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 32 * 32, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_mismatched_classifiers_and_label_sets_fail_clearly(tmp_path, cifar10, train_pairs):
    data = train_pairs.select(range(4))
    cifar_stats = dict(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), labels=EXAMPLE.CIFAR10_LABELS, num_classes=10)
    wrong_size = ImageClassifier(Net32(), input_size=64, **cifar_stats)
    with pytest.raises(ValueError, match=r"declared input_size=64.*fails on a batch of shape \(2, 3, 32, 32\)"):
        finetune(tiny_model(), wrong_size, data, max_steps=1, **common(tmp_path, "a"))
    with pytest.raises(ValueError, match="grayscale"):  # a 1-channel network given RGB images
        finetune(tiny_model(), ImageClassifier(Net32(in_channels=1), 32, **cifar_stats), data, max_steps=1, **common(tmp_path, "b"))
    features_only = nn.Sequential(nn.Conv2d(3, 4, 3))  # no head: feature maps, not logits
    with pytest.raises(ValueError, match=r"must return \(N, num_classes\) logits.*got \(2, 4, 30, 30\)"):
        finetune(tiny_model(), features_only, data, max_steps=1, **common(tmp_path, "c"))
    # pairs labelled for another label set (here: a 5-class classifier's) are refused
    five = offline_pairs(ImageClassifier(Net32(num_classes=5), 32, labels=list("abcde")), tmp_path / "five", 2,
                         attacks=["fgsm"])
    with pytest.raises(ValueError, match=r"dataset's labels \(5 classes: a, b.*not the classifier's \(10 classes: airplane"):
        finetune(tiny_model(), cifar10, five, max_steps=1, **common(tmp_path, "d"))
    # a plain network (no timm model inside) needs its perceptual layers named
    right = ImageClassifier(Net32(), input_size=32, **cifar_stats)
    with pytest.raises(ValueError, match="cannot choose perceptual layers"):
        finetune(tiny_model(), right, data, max_steps=1, **common(tmp_path, "e"))
    assert not any((tmp_path / name).exists() for name in "abcde")  # everything failed before training
    finetune(tiny_model(), right, data, max_steps=1, perceptual_layers={"model.conv": 1.0, "model.fc": 1.0}, **common(tmp_path, "f"))
    assert (tmp_path / "f" / "model.safetensors").is_file()


def test_class_folders_map_to_the_classifiers_labels():
    names = ["airplane", "automobile", "bird"]
    assert class_indices(["Bird", "automobile", "0"], names, 3) == {"Bird": 2, "automobile": 1, "0": 0}
    assert class_indices(["zebra", "apple"], None, 3) == {"apple": 0, "zebra": 1}  # torchvision ImageFolder order
    with pytest.raises(ValueError, match=r"class folder\(s\) \['horse'\] match none of the classifier's 3 labels"):
        class_indices(["bird", "horse"], names, 3)
    with pytest.raises(ValueError, match="4 class folders for a classifier with 3 classes"):
        class_indices(list("abcd"), None, 3)


# ---------------------------------------------------------------------------------- builders and CLI
def test_offline_builder_pairs_follow_a_custom_label_set(tmp_path, cifar10):
    pairs = build_finetuning_dataset(cifar10, "offline", tmp_path / "pairs", image_size=32, attacks=["fgsm"],
                                     train_size=4, validation_size=2, progress=False)
    assert set(pairs) == {"train", "validation"}
    assert pairs["train"].features["label"].names == EXAMPLE.CIFAR10_LABELS
    clean = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in pairs["train"]["clean"]])
    # unlabelled photos: the label is the classifier's own clean prediction, in its 10-class space
    assert pairs["train"]["label"] == cifar10(clean).argmax(dim=1).tolist()


def test_cli_builds_image_folder_pairs_and_finetunes_a_custom_head(tmp_path, cifar10, capsys):
    from safetensors.torch import save_file

    from impure_hf.cli import build_parser

    # an ImageFolder of real crops, each filed under the class the classifier gives it
    crops = photo_crops("train", 12, seed=3)
    predictions = cifar10(crops).argmax(dim=1).tolist()
    for i, (crop, label) in enumerate(zip(crops, predictions)):
        folder = tmp_path / "images" / EXAMPLE.CIFAR10_LABELS[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"crop{i}.png")
    save_file(cifar10.model.state_dict(), str(tmp_path / "cifar10-head.safetensors"))
    (tmp_path / "labels.txt").write_text("\n".join(EXAMPLE.CIFAR10_LABELS))

    parser = build_parser()
    argv = [
        "finetune", "--from", str(BASE), "--classifier", "tf_efficientnet_lite0", "--num-classes", "10",
        "--labels", str(tmp_path / "labels.txt"), "--classifier-weights", str(tmp_path / "cifar10-head.safetensors"),
        "--input-size", "32", "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5",
        "--data", str(tmp_path / "images"), "--attacks", "fgsm", "--eps", "8/255", "--validation-fraction", "0.25",
        "--max-steps", "2", "--batch-size", "4", "--freeze-encoder", "--output-dir", str(tmp_path / "run"),
        "--report-to", "none",
    ]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    pairs = load_adversarial_dataset(tmp_path / "run" / "pairs")
    assert pairs["train"].features["label"].names == EXAMPLE.CIFAR10_LABELS
    # the builder frames each file as every entry point does and attacks only what the classifier then
    # still gets right (the paper's protocol): exactly those files, each with its folder's label
    files = sorted((tmp_path / "images").rglob("*.png"))
    framed = ImpureImageProcessor(crop_size=32)([Image.open(f) for f in files])["pixel_values"]
    still_right = {f.relative_to(tmp_path / "images").as_posix(): label
                   for f, label in zip(files, cifar10(framed).argmax(dim=1).tolist())
                   if EXAMPLE.CIFAR10_LABELS[label] == f.parent.name}
    built = {sid: label for split in ("train", "validation") for sid, label in zip(pairs[split]["source_id"], pairs[split]["label"])}
    assert built == still_right and len(pairs["validation"]) >= 1
    summary = json.loads((tmp_path / "run" / "finetune_summary.json").read_text())
    tuned = ImpureModel.from_pretrained(tmp_path / "run")
    # the summary reports the saved model on the held-out pairs
    assert summary["images"] == len(pairs["validation"])
    assert summary["after"]["top1"] == pytest.approx(validation_metrics(tuned, pairs["validation"], cifar10)["top1"])
    assert torch.equal(tuned.blocks[0].attn.qkv.weight, ImpureModel.from_pretrained(BASE).blocks[0].attn.qkv.weight)

    # a rerun with other settings does not silently reuse the pairs
    args = parser.parse_args([a if a != "8/255" else "4/255" for a in argv])
    assert args.func(args) == 2
    assert "holds a build with other settings (differing: eps)" in capsys.readouterr().err
    # weights that do not fit the declared head are reported before anything is built
    argv[argv.index("--num-classes") + 1] = "5"
    argv[argv.index("--labels") : argv.index("--labels") + 2] = []
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "other")
    args = parser.parse_args(argv)
    assert args.func(args) == 2
    assert "does not fit tf_efficientnet_lite0 with 5 classes" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------------------------- transformers
def test_pipeline_runs_the_purified_classifier(cifar10):
    from transformers import pipeline

    from impure_hf import ImpureImageProcessor, PurifiedClassifier

    purifier = ImpureModel.from_pretrained(BASE).eval()
    photos = [Image.open(package_file(name)).convert("RGB") for name in OFFLINE_PHOTOS["validation"]]
    pipe = purified_pipeline(purifier, cifar10, generator=torch.Generator().manual_seed(0), top_k=10)
    results = pipe(photos)
    pixel_values = ImpureImageProcessor(crop_size=32)(photos)["pixel_values"]
    generator = torch.Generator().manual_seed(0)  # the pipeline runs one image at a time on one noise stream
    with torch.no_grad():
        expected = torch.cat([PurifiedClassifier(purifier, cifar10)(x[None], generator=generator) for x in pixel_values])
    probabilities = expected.softmax(dim=-1)
    for result, row in zip(results, probabilities):
        assert [r["label"] for r in result][0] == EXAMPLE.CIFAR10_LABELS[int(row.argmax())]
        assert sorted(r["label"] for r in result) == sorted(EXAMPLE.CIFAR10_LABELS)
        assert sum(r["score"] for r in result) == pytest.approx(1, abs=1e-5)
        assert result[0]["score"] == pytest.approx(float(row.max()), abs=1e-5)

    # the two-line alternative: the model class in transformers' own pipeline
    model = PurifiedImageClassification(purifier=purifier, classifier=cifar10, generator=torch.Generator().manual_seed(0))
    direct = pipeline("image-classification", model=model, image_processor=ImpureImageProcessor(crop_size=32))
    assert [r[0]["label"] for r in direct(photos)] == [r[0]["label"] for r in results]
    output = model(pixel_values, labels=torch.zeros(len(photos), dtype=torch.long))
    assert output.logits.shape == (len(photos), 10) and output.loss.item() > 0
    assert model.config.id2label[3] == "cat" and model.config.num_labels == 10
