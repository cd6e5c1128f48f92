"""``--dtype auto``: bf16 only where it is measured faster on this machine and agrees with fp32."""

from __future__ import annotations

import itertools

import pytest
import torch

from impure_hf import precision
from impure_hf.precision import AGREEMENT_PSNR_DB, SPEEDUP, autocast, choose_dtype

from conftest import tiny_model


def test_explicit_dtypes_are_taken_as_given_and_unknown_ones_are_named():
    model = tiny_model().eval()
    assert choose_dtype(model, "fp32").dtype == "fp32"
    assert choose_dtype(model, "bf16").dtype == "bf16"
    with pytest.raises(ValueError, match="unknown dtype 'fp16'"):
        choose_dtype(model, "fp16")


def test_auto_measures_here_and_never_picks_a_slower_or_disagreeing_bf16():
    model = tiny_model().eval()
    choice = choose_dtype(model, "auto", batch_size=2, repeats=2)
    assert choice.dtype in ("fp32", "bf16")
    assert choice.fp32_seconds > 0 and choice.bf16_seconds > 0
    if choice.dtype == "bf16":
        assert choice.bf16_seconds * SPEEDUP <= choice.fp32_seconds and choice.psnr_db >= AGREEMENT_PSNR_DB
    assert choice.dtype in str(choice)
    assert model.training is False


def _fake_clock(monkeypatch, fp32: float, bf16: float):
    """perf_counter as if every fp32 forward took ``fp32`` s and every bf16 forward ``bf16`` s."""
    steps = itertools.cycle([0.0, fp32, 0.0, bf16])  # start, stop for fp32; start, stop for bf16 (interleaved)
    monkeypatch.setattr(precision.time, "perf_counter", lambda: next(steps))


def test_auto_keeps_fp32_where_bf16_is_slower(monkeypatch):
    _fake_clock(monkeypatch, fp32=1.0, bf16=1.5)
    choice = choose_dtype(tiny_model().eval(), "auto", repeats=2)
    assert choice.dtype == "fp32" and "not faster" in choice.reason


def test_auto_takes_bf16_where_it_is_faster(monkeypatch):
    _fake_clock(monkeypatch, fp32=1.0, bf16=0.5)
    choice = choose_dtype(tiny_model().eval(), "auto", repeats=2)
    assert choice.dtype == "bf16" and choice.psnr_db >= AGREEMENT_PSNR_DB


def test_auto_keeps_fp32_where_bf16_output_disagrees(monkeypatch):
    _fake_clock(monkeypatch, fp32=1.0, bf16=0.5)
    real = precision._purify

    def coarse(model, pixels, dtype, seed):  # a bf16 that loses the image: 4-bit output
        out = real(model, pixels, dtype, seed)
        return (out * 15).round() / 15 if dtype == "bf16" else out

    monkeypatch.setattr(precision, "_purify", coarse)
    choice = choose_dtype(tiny_model().eval(), "auto", repeats=2)
    assert choice.dtype == "fp32" and choice.psnr_db < AGREEMENT_PSNR_DB


def test_bf16_autocast_runs_matmuls_in_bf16():
    x = torch.randn(4, 8)
    with autocast("bf16", x.device):
        assert (x @ x.T).dtype == torch.bfloat16
    with autocast("fp32", x.device):
        assert (x @ x.T).dtype == torch.float32


def test_set_precision_makes_the_forward_run_in_bf16_and_back_in_fp32():
    from impure_hf.precision import set_precision

    model = tiny_model().eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = model(x, generator=torch.Generator().manual_seed(1)).purified_pixel_values
    seen = []
    hook = model.decoder_pred.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    assert set_precision(model, "bf16").dtype == "bf16" and model.autocast_dtype == torch.bfloat16
    out = model(x, generator=torch.Generator().manual_seed(1))
    assert seen[-1] == torch.bfloat16  # the layers ran in bf16 ...
    assert out.purified_pixel_values.dtype == torch.float32 and out.reconstruction.dtype == torch.float32  # ... the output is fp32
    assert 0 < (out.purified_pixel_values - reference).abs().max() < 0.05
    assert set_precision(model, "fp32").dtype == "fp32" and model.autocast_dtype is None
    model(x, generator=torch.Generator().manual_seed(1))
    assert seen[-1] == torch.float32
    hook.remove()
    again = model(x, generator=torch.Generator().manual_seed(1)).purified_pixel_values
    assert torch.equal(again, reference)


@pytest.mark.parametrize("dtype", ["auto", "bf16", "fp32"])
def test_purify_command_says_which_precision_it_chose(dtype, tmp_path, capsys):
    from PIL import Image

    from conftest import real_photos
    from impure_hf.cli import main

    tiny_model().save_pretrained(tmp_path / "model")
    photo = (real_photos(size=32, n=1)[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(photo).save(tmp_path / "photo.png")
    code = main(["purify", str(tmp_path / "photo.png"), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "model"), "--dtype", dtype])
    assert code == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("precision: "))
    assert line.split()[1] in (("fp32", "bf16") if dtype == "auto" else (dtype,))
    assert ("measured" in line or "not faster" in line or "dB" in line) if dtype == "auto" else "requested" in line
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_evaluation_cache_keys_keep_fp32_as_before_and_separate_bf16():
    from impure_hf.evaluation.settings import EvalSettings

    fp32 = EvalSettings().checked().cell_key(white_box=False, stochastic=True)
    bf16 = EvalSettings(dtype="bf16").checked().cell_key(white_box=False, stochastic=True)
    assert "dtype" not in fp32 and bf16 == {**fp32, "dtype": "bf16"}
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        EvalSettings(dtype="half").checked()
