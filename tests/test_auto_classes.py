"""save_pretrained / Auto classes round trips, in-process and in a process that never imports impure_hf."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from impure_hf import ImpureImageProcessor, ImpureModel

from conftest import real_photos, tiny_model


def _purified(model, x, seed=7):
    return model.eval()(x, generator=torch.Generator().manual_seed(seed)).purified_pixel_values


def test_save_pretrained_auto_round_trip(tmp_path):
    model = tiny_model()
    x = real_photos()
    model.save_pretrained(tmp_path)
    ImpureImageProcessor(crop_size=32).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "impure-riae" and "AutoModel" in config["auto_map"]

    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is ImpureModel and type(AutoConfig.from_pretrained(tmp_path)).__name__ == "ImpureConfig"
    torch.testing.assert_close(_purified(loaded, x), _purified(model, x), rtol=0, atol=1e-5)
    # every tensor, fixed tables included, survives exactly
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, ImpureImageProcessor) and processor.crop_size == {"height": 32, "width": 32}


def test_remote_code_loads_without_importing_impure_hf(tmp_path):
    model = tiny_model()
    x = real_photos()
    model.save_pretrained(tmp_path / "model")
    ImpureImageProcessor(crop_size=32).save_pretrained(tmp_path / "model")
    for name in ("configuration_impure.py", "layers_impure.py", "modeling_impure.py", "image_processing_impure.py"):
        assert (tmp_path / "model" / name).exists(), f"remote code file {name} not saved"
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoImageProcessor, AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert "impure_hf" not in sys.modules, "impure_hf was imported"
        assert type(processor).__name__ == "ImpureImageProcessor"
        x = torch.load({str(tmp_path / "x.pt")!r})
        out = model(x, generator=torch.Generator().manual_seed(7)).purified_pixel_values
        torch.save(out, {str(tmp_path / "out.pt")!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), _purified(model, x), rtol=0, atol=1e-5)
