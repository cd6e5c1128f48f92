"""impure export: ONNX file whose noise is an input, checked against eager with onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from impure_hf import ImpureNoise
from impure_hf.cli import main
from impure_hf.export import PurifierWithNoiseInputs, check_onnx

from conftest import real_photos, tiny_model

ort = pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
pytest.importorskip("onnxscript", reason="the [export] extra is not installed")


def test_cli_exports_onnx_that_replays_eager_with_fed_noise(tmp_path, capsys):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "purifier.onnx"
    assert main(["export", str(tmp_path / "model"), "--format", "onnx", "--out", str(out)]) == 0
    assert "onnxruntime matches eager" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob("tmp*"))  # no leftovers

    # our own check, independent of the exporter's: real photos, noise fed as inputs, a batch size
    # the exporter did not use (4)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values", "image_noise", "feature_noise"]
    c, x = model.config, real_photos(n=4)
    gen = torch.Generator().manual_seed(4)
    image_noise = torch.randn(x.shape, generator=gen)
    feature_noise = torch.randn(4, 64, c.decoder_hidden_size, generator=gen)
    (onnx_out,) = session.run(None, {"pixel_values": x.numpy(), "image_noise": image_noise.numpy(), "feature_noise": feature_noise.numpy()})
    with torch.no_grad():
        eager = model(x, noise=ImpureNoise(image_noise=image_noise, feature_noise=feature_noise)).purified_pixel_values
    np.testing.assert_allclose(onnx_out, eager.numpy(), rtol=0, atol=1e-4)
    # other noise, other output: the noise really is an input, not a constant of the graph
    (other,) = session.run(None, {"pixel_values": x.numpy(), "image_noise": -image_noise.numpy(), "feature_noise": feature_noise.numpy()})
    assert np.abs(other - onnx_out).max() > 1e-2


def test_check_rejects_a_graph_of_other_weights(tmp_path):
    out = tmp_path / "purifier.onnx"
    assert main(["export", _saved(tiny_model(seed=0), tmp_path), "--out", str(out)]) == 0
    other = PurifierWithNoiseInputs(tiny_model(seed=1))
    with pytest.raises(ValueError, match="differs from eager"):
        check_onnx(out, other, other.example_inputs(1, 32))


def _saved(model, tmp_path) -> str:
    model.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def test_residual_fill_model_exports_and_replays_eager(tmp_path, capsys):
    # the harmonic fill's solve plan is built with numpy on first use: it must become constants of
    # the graph, and the graph must still take other images (a batch size it was not traced with)
    model = tiny_model(residual_fill="harmonic").eval()
    out = tmp_path / "purifier.onnx"
    assert main(["export", _saved(model, tmp_path), "--out", str(out)]) == 0
    assert "onnxruntime matches eager" in capsys.readouterr().out
    wrapper = PurifierWithNoiseInputs(model)
    inputs = (real_photos(n=3), *wrapper.example_inputs(3, 32, seed=5)[1:])
    assert check_onnx(out, wrapper, inputs) <= 1e-4


def test_own_patch_gate_model_exports_and_replays_eager(tmp_path, capsys):
    model = tiny_model(residual_fill="harmonic", own_patch_gate=True).eval()  # gate weights perturbed, not zero
    ungated = tiny_model(residual_fill="harmonic", own_patch_gate=True).eval()  # the same weights, gate zeroed
    with torch.no_grad():
        for p in ungated.own_patch_gate.parameters():
            p.zero_()
    wrapper = PurifierWithNoiseInputs(model)
    inputs = (real_photos(n=3), *wrapper.example_inputs(3, 32, seed=5)[1:])
    with torch.no_grad():  # the gate path matters here, so a graph that dropped it would fail the check
        assert (wrapper(*inputs) - PurifierWithNoiseInputs(ungated)(*inputs)).abs().max() > 1e-2
    out = tmp_path / "purifier.onnx"
    assert main(["export", _saved(model, tmp_path), "--out", str(out)]) == 0
    assert "onnxruntime matches eager" in capsys.readouterr().out
    assert check_onnx(out, wrapper, inputs) <= 1e-4
