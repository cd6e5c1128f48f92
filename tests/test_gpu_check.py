"""benchmarks/gpu_check.py: its structure on a CPU with tiny sizes (the figures come from a GPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_progress_parsing_and_steady_rate():
    gpu_check = _load()
    line = "training:  45%|████▌     | 90/200 [00:30<00:37,  2.95it/s, loss=0.1234]"
    assert gpu_check._PROGRESS.search(line).groups() == ("90", "200")
    # 1 step/s during warm-up (compilation), then 4 steps/s: only the steady part counts
    progress = [(float(t), t) for t in range(0, 50)] + [(50 + (s - 50) / 4, s) for s in range(51, 201)]
    assert gpu_check.steady_rate(progress, total=200) == pytest.approx(4.0)
    assert gpu_check.steady_rate([(0.0, 1)], total=200) is None


@pytest.mark.slow  # two `accelerate launch` runs: about 90 s on 2 shared cores
def test_tiny_run_writes_json_and_markdown(tmp_path):
    gpu_check = _load()
    assert gpu_check.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    settings = {row["setting"] for row in report["inference"]}
    assert {"vit_b fp32", "purifier fp32", "vit_b bf16", "purifier bf16", "purifier bf16 compiled"} <= settings
    assert all(row["images_per_s"] > 0 for row in report["inference"])
    assert [row["returncode"] for row in report["training"]] == [0, 0]
    assert all(row["steps"] == 4 and row["steps_per_s"] for row in report["training"])
    assert "## Training" in (tmp_path / "gpu_check.md").read_text()
