"""The benchmark's measuring code (``impure bench``): it runs, and what it reports is consistent.

No speed is asserted here (timings belong in benchmarks/, not in unit tests); these tests check
that each section measures what its row says.
"""

import math

import pytest
import torch

from impure_hf.bench import bf16_agreement, count_flops, run_benchmark, to_markdown, training_step
from impure_hf.classifiers import load_classifier
from impure_hf.evaluation import load_eval_images
from impure_hf.loading import load_purifier
from impure_hf.modeling_impure import ImpureModel


def test_flop_count_of_the_purifier_grows_linearly_with_batch():
    model = ImpureModel.from_preset("impure-vit-tiny").eval()
    x = torch.rand(2, 3, 224, 224)
    one = count_flops(lambda: model(x[:1], generator=torch.Generator().manual_seed(0)))
    two = count_flops(lambda: model(x, generator=torch.Generator().manual_seed(0)))
    assert one > 0 and two == 2 * one


@pytest.mark.parametrize("loss", ["l1", "classifier"])
def test_training_step_updates_the_purifier(loss):
    step = training_step("impure-vit-tiny", batch=1, loss=loss, image_size=64)
    before = step.model.decoder_pred.weight.detach().clone()
    step()
    assert not torch.equal(before, step.model.decoder_pred.weight)


def test_training_step_rejects_an_unknown_loss():
    with pytest.raises(ValueError, match="loss must be"):
        training_step("impure-vit-tiny", batch=1, loss="mse", image_size=64)


@pytest.mark.slow
def test_inference_section_reports_ratios_and_memory_for_each_setting(capsys):
    rows = run_benchmark(presets=("impure-vit-tiny",), batches=(1,), memory_batches=(2,), repeats=1, sections=("inference",))
    timed = [r for r in rows if "ms_per_image" in r]
    assert {r["setting"] for r in timed} >= {"purifier default", "decoder: per-subset loop", "ViT-B/16 fp32"}
    vit = next(r for r in timed if r["setting"] == "ViT-B/16 fp32")
    assert vit["time_vs_vit_b"] == pytest.approx(1.0)
    assert all(r["ms_per_image"] > 0 and r["gflop_per_image"] > 0 for r in timed)
    assert vit["gflop_per_image"] == pytest.approx(33.7, rel=0.05)  # timm ViT-B/16 at 224 px, FlopCounterMode
    memory = [r for r in rows if "peak_mb_above_model" in r]
    assert len(memory) == 3 and all(math.isfinite(r["peak_mb_above_model"]) for r in memory)
    assert "| impure-vit-tiny | 1 | purifier default |" in capsys.readouterr().out


def test_unknown_section_is_refused():
    with pytest.raises(ValueError, match="unknown benchmark section"):
        run_benchmark(presets=("impure-vit-tiny",), sections=("speed",))


def test_markdown_lists_the_extra_sections():
    summary = {
        "matmul_gflop_per_s": 100.0, "torch": torch.__version__, "rows": [],
        "training": [{"preset": "impure-vit-tiny", "batch": 8, "setting": "training step, loss l1", "s_per_step": 2.0, "images_per_hour": 14400.0, "peak_mb_above_model": 500.0}],
        "bf16": {"model": "embedded default", "images": 20, "psnr_bf16_vs_fp32_db": 41.5, "predictions_changed": 1},
        "attacks": [{"setting": "attack pgd", "images_per_s": 3.5}],
    }
    text = to_markdown(summary)
    assert "| impure-vit-tiny | 8 | training step, loss l1 | 2.00 | 14400 | 500 |" in text
    assert "PSNR between the two purified versions 41.5 dB" in text and "changed: 1 of 20" in text
    assert "| attack pgd | 3.50 |" in text


def test_bf16_agreement_compares_the_same_draws(tmp_path):
    ImpureModel.from_preset("impure-vit-tiny").save_pretrained(tmp_path / "tiny")
    result = bf16_agreement(str(tmp_path / "tiny"))
    assert result["images"] == 20
    # the same noise in both passes: only bf16 rounding separates them
    assert 30 < result["psnr_bf16_vs_fp32_db"] < float("inf")
    # the count is of the classifier's predictions on the two purified versions: recount them here
    purifier, classifier = load_purifier(str(tmp_path / "tiny")), load_classifier("efficientnet_lite0")
    images = load_eval_images(image_size=224).pixel_values
    predictions = []
    for dtype in (None, torch.bfloat16):
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            purified = torch.cat([purifier(images[i : i + 4], generator=generator).purified_pixel_values.float()
                                  for i in range(0, len(images), 4)])
        with torch.inference_mode():
            predictions.append(classifier(purified).argmax(dim=-1))
    assert result["predictions_changed"] == int((predictions[0] != predictions[1]).sum())
