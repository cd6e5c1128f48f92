"""Target classifiers: the [0, 1] wrapper, offline EfficientNet-Lite0, timm weights files, transformers folders."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from fixtures_data import foolbox_batch, lite0
from impure_hf.classifiers import (
    IMAGENET_LABELS,
    IMAGENET_SYNSETS,
    ImageClassifier,
    load_classifier,
    predict,
    read_state_dict,
)


def tiny_net(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)).eval()


def test_imagenet_labels_are_1000_unique_names_in_index_order():
    assert len(IMAGENET_LABELS) == len(set(IMAGENET_LABELS)) == len(IMAGENET_SYNSETS) == 1000
    assert IMAGENET_SYNSETS[0] == "n01440764" and IMAGENET_LABELS[0].startswith("tench")
    assert IMAGENET_LABELS[243].startswith("bull mastiff")  # foolbox's imagenet_00_243.jpg
    cranes = [name for name in IMAGENET_LABELS if name.startswith("crane")]
    assert len(cranes) == 2  # the bird and the machine, told apart by their WordNet ids


def test_efficientnet_lite0_classifies_foolbox_photos():
    classifier = lite0()
    assert (classifier.input_size, classifier.num_classes, classifier.name) == (224, 1000, "efficientnet_lite0")
    assert classifier.labels == IMAGENET_LABELS
    assert not classifier.training and not any(p.requires_grad for p in classifier.parameters())
    images, labels = foolbox_batch(224)
    accuracy = (predict(classifier, images) == labels).float().mean().item()
    assert accuracy >= 0.8, accuracy  # 17 of the 20 photos with these weights (the processor's rule)


def test_forward_resizes_and_normalises():
    net = tiny_net()
    classifier = ImageClassifier(net, 32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    assert classifier.num_classes == 5 and classifier.labels is None  # found by a probe forward
    assert not classifier.training  # keeps the wrapped model's mode
    x = torch.rand(2, 3, 64, 48)
    small = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    expected = net((small - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))
    torch.testing.assert_close(classifier(x), expected)
    with pytest.raises(ValueError, match="shape"):
        classifier(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="labels"):
        ImageClassifier(net, 32, labels=["a", "b"])
    # a head sized for 32 px inputs cannot be probed at 48 px: a clear error, not a raw matmul one
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))
    with pytest.raises(ValueError, match="input_size.*num_classes="):
        ImageClassifier(flat, 48)
    assert ImageClassifier(flat, 48, num_classes=5).num_classes == 5


def test_transformers_folder(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"}, label2id={"cat": 0, "dog": 1, "fox": 2},
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(tmp_path)
    classifier = load_classifier(str(tmp_path))
    assert (classifier.input_size, classifier.labels, classifier.num_classes) == (32, ["cat", "dog", "fox"], 3)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(classifier(x), classifier.model((x - 0.5) / 0.25).logits)


def test_weights_files(tmp_path):
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    good = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(good))
    classifier = load_classifier("resnet18", weights=good)
    torch.testing.assert_close(classifier.model.fc.weight, resnet.fc.weight)
    assert classifier.input_size == 224 and classifier.labels == IMAGENET_LABELS

    # a torch file nested under "state_dict" reads back the same tensors (weights_only load)
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, nested)
    assert torch.equal(read_state_dict(nested)["w"], torch.arange(3.0))

    # weights of another architecture: a clear error, for timm names and the offline model alike
    with pytest.raises(ValueError, match="does not match"):
        load_classifier("resnet34", weights=good)
    with pytest.raises(ValueError, match="do not match"):
        load_classifier("efficientnet_lite0", weights=good)
    with pytest.raises(FileNotFoundError):
        load_classifier("resnet18", weights=tmp_path / "missing.safetensors")


def test_unknown_classifier():
    with pytest.raises(ValueError, match="unknown classifier 'no_such_network'"):
        load_classifier("no_such_network")
