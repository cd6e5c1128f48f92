"""One prepared check for a CUDA machine (under 8 minutes on one modern GPU); writes JSON + markdown.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu            # on the GPU machine
    python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/check    # the structure, on a CPU

Sections:

- inference: images/s and peak memory of ``impure-vit-b`` (random weights) beside timm's
  ``vit_base_patch16_224`` at the same batch, in fp32 and under bf16 autocast, the purifier also
  under ``torch.compile``;
- training: a couple of hundred optimizer steps of ``impure-vit-b`` with the paper's configuration
  (configs/train_paper.yaml: AdamW, L1 + VGG19 perceptual loss with RCM) through
  ``accelerate launch`` with bf16, ``--dynamo_backend no`` and ``inductor`` (torch.compile off / on),
  and the FSDP2 configuration (configs/fsdp.yaml) on one GPU. Steady-state steps/s are read from
  the trainer's progress bar after the first 25 % of the steps (compilation and warm-up excluded);
  peak GPU memory is polled with nvidia-smi.

The machine has no network: the data are synthetic pairs (real photos from scikit-image, random
crops, a sign perturbation), the VGG19 of the perceptual loss has random weights (same cost as the
ImageNet one) and there is no validation classifier.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from impure_hf.bench import _interleaved_times
from impure_hf.data import adversarial_features
from impure_hf.modeling_impure import ImpureModel

ROOT = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                      decoder_num_attention_heads=2, decoder_intermediate_size=64, fusion_layers=[0])


# ---------------------------------------------------------------------------------- inference
def _models(tiny: bool, device: torch.device):
    import timm

    if tiny:
        purifier = ImpureModel.from_preset("impure-vit-tiny", **TINY_OVERRIDES)
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2)
    else:
        purifier = ImpureModel.from_preset("impure-vit-b")
        vit = timm.create_model("vit_base_patch16_224", pretrained=False)
    return purifier.to(device).eval(), vit.to(device).eval()


def _peak_memory(fn, device: torch.device):
    """Peak allocated bytes during ``fn()`` on CUDA (None elsewhere)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def run_inference(tiny: bool, device: torch.device, batch: int, repeats: int, compile_purifier: bool = True) -> list[dict]:
    purifier, vit = _models(tiny, device)
    size = purifier.config.image_size
    x = torch.rand(batch, 3, size, size, device=device)
    # the compiled purifier draws its noise from the global RNG (a Generator argument would break the
    # graph); on a CPU the cheap "eager" backend checks the structure without minutes of C++ builds
    backend = "inductor" if device.type == "cuda" else "eager"
    compiled = torch.compile(purifier, backend=backend) if compile_purifier else None
    settings = {}
    for dtype in ("fp32", "bf16"):
        settings[f"vit_b {dtype}"] = (vit, dtype)
        settings[f"purifier {dtype}"] = (purifier, dtype)
        if compiled is not None:
            settings[f"purifier {dtype} compiled"] = (compiled, dtype)
    calls, rows = {}, []
    for name, (module, dtype) in settings.items():
        def call(module=module, dtype=dtype):
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
            with torch.inference_mode(), autocast:
                module(x)

        start = time.perf_counter()
        call()  # warm-up (and compilation)
        warmup_s = time.perf_counter() - start
        peak = _peak_memory(call, device)
        calls[name] = call
        rows.append({"setting": name, "batch": batch, "warmup_s": warmup_s, "peak_memory_bytes": peak})
    times = _interleaved_times(calls, repeats, device)
    for row in rows:
        median = statistics.median(times[row["setting"]])
        row.update(median_s=median, images_per_s=batch / median)
    return rows


# ---------------------------------------------------------------------------------- training
def write_dataset(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """A dataset folder as `impure make-dataset` writes it (parquet + card), of synthetic pairs."""
    import datasets
    from PIL import Image
    from skimage import data as photos

    rng = np.random.default_rng(seed)
    sources = [getattr(photos, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")]
    clean, adversarial = [], []
    for i in range(n):
        image = sources[i % len(sources)]
        side = int(rng.integers(size, min(image.shape[:2]) + 1))
        top, left = (int(rng.integers(0, image.shape[k] - side + 1)) for k in (0, 1))
        crop = Image.fromarray(image[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
        array = np.asarray(crop, dtype=np.int16)
        perturbed = np.clip(array + 8 * np.sign(rng.standard_normal(array.shape)), 0, 255).astype(np.uint8)
        clean.append(crop)
        adversarial.append(Image.fromarray(perturbed))
    rows = {"clean": clean, "adversarial": adversarial, "label": [0] * n, "attack": ["sign"] * n,
            "classifier": ["none"] * n, "eps": [8 / 255] * n, "source_id": [f"synthetic-{i}" for i in range(n)]}
    (folder / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=adversarial_features(["synthetic"])).to_parquet(
        str(folder / "data" / "train-00000.parquet")
    )
    (folder / "README.md").write_text("synthetic clean / adversarial pairs for benchmarks/gpu_check.py\n")
    return folder


_PROGRESS = re.compile(r"training:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def steady_rate(progress: list[tuple[float, int]], total: int, skip: float = 0.25):
    """Steps/s between the first update past ``skip`` of the steps and the last one."""
    after = [(t, s) for t, s in progress if s >= max(1, int(skip * total))]
    if len(after) < 2 or after[-1][1] == after[0][1]:
        return None
    (t0, s0), (t1, s1) = after[0], after[-1]
    return (s1 - s0) / (t1 - t0)


class _GpuMemoryPoller(threading.Thread):
    """Largest nvidia-smi memory.used (MiB) above the value at start, while running."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.peak, self.base, self._stop = interval, None, None, threading.Event()

    def _read(self):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10)
            return float(out.stdout.split()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def run(self):
        self.base = self._read()
        while not self._stop.wait(self.interval):
            used = self._read()
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)

    def stop(self):
        self._stop.set()
        self.join()
        return None if self.peak is None or self.base is None else (self.peak - self.base) * 2**20


def run_training(name: str, launcher: list[str], train_args: list[str], steps: int, env: dict, timeout: int) -> dict:
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "impure_hf.train", *train_args]
    poller = _GpuMemoryPoller() if torch.cuda.is_available() else None
    if poller:
        poller.start()
    progress, tail, start = [], [], time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    buffer = b""
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # tqdm writes \r-separated updates
        buffer += chunk
        *pieces, buffer = re.split(rb"[\r\n]", buffer)
        for piece in pieces:
            text = piece.decode(errors="replace")
            if (match := _PROGRESS.search(text)) is not None:
                progress.append((time.perf_counter(), int(match.group(1))))
            elif text.strip():
                tail = (tail + [text])[-30:]
    returncode = proc.wait()
    timer.cancel()
    wall = time.perf_counter() - start
    peak = poller.stop() if poller else None
    done = progress[-1][1] if progress else 0
    row = {"run": name, "returncode": returncode, "steps": done, "wall_s": wall,
           "steps_per_s": steady_rate(progress, steps), "peak_gpu_memory_bytes": peak}
    if returncode != 0:
        row["error_tail"] = "\n".join(tail)
    return row


def training_runs(tiny: bool, device: torch.device, steps: int, batch: int, data: Path, out: Path, timeout: int,
                  deadline: float = float("inf")) -> list[dict]:
    args = ["--config", str(ROOT / "configs" / "train_paper.yaml"), "--dataset", str(data), "--eval-split", "none",
            "--max-steps", str(steps), "--batch-size", str(batch), "--no-perceptual-pretrained",
            "--report-to", "none", "--save-steps", str(10 * steps), "--total-limit", "1", "--logging-steps", "10",
            "--warmup-steps", "10", "--num-workers", "0" if tiny else "4"]
    if tiny:
        args += ["--model", "impure-vit-tiny", "--model-overrides", json.dumps(TINY_OVERRIDES),
                 "--perceptual-loss", "none", "--logging-steps", "1"]
    env = {**os.environ, "TQDM_MININTERVAL": "0"}
    if device.type == "cuda":
        runs = [
            ("bf16, compile off", ["--config_file", str(ROOT / "configs" / "single_gpu.yaml"), "--dynamo_backend", "no"]),
            ("bf16, compile on (inductor)", ["--config_file", str(ROOT / "configs" / "single_gpu.yaml"), "--dynamo_backend", "inductor"]),
            ("bf16, FSDP2 on 1 GPU", ["--config_file", str(ROOT / "configs" / "fsdp.yaml"), "--num_processes", "1"]),
        ]
    else:  # the structure on a CPU: one process, compile through the cheap "eager" backend
        env["ACCELERATE_USE_CPU"] = "1"
        runs = [
            ("fp32, compile off", ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]),
            ("fp32, compile on (eager backend)", ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "eager"]),
        ]
    rows = []
    for i, (name, launcher) in enumerate(runs):
        if time.perf_counter() + timeout > deadline:  # keep the whole check inside its time budget
            rows.append({"run": name, "returncode": None, "steps": 0, "wall_s": 0.0, "steps_per_s": None,
                         "peak_gpu_memory_bytes": None, "skipped": "time budget"})
            continue
        rows.append(run_training(name, launcher, [*args, "--output-dir", str(out / f"run{i}")], steps, env, timeout))
    return rows


# ---------------------------------------------------------------------------------- report
def environment(device: torch.device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cpu": platform.processor() or platform.machine(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}")
    return env


def _mb(value):
    return "-" if value is None else f"{value / 2**20:.0f}"


def _num(value, fmt=".1f"):
    return "-" if value is None else format(value, fmt)


def to_markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# gpu_check", "", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "## Inference", "", "| setting | batch | images/s | ms/image | peak MB | warm-up s |", "|---|---|---|---|---|---|"]
    for row in report["inference"]:
        lines.append(f"| {row['setting']} | {row['batch']} | {row['images_per_s']:.1f} | {1000 / row['images_per_s']:.2f} "
                     f"| {_mb(row['peak_memory_bytes'])} | {row['warmup_s']:.1f} |")
    lines += ["", "## Training (accelerate launch, configs/train_paper.yaml)", "",
              "| run | exit | steps | steady steps/s | wall s | peak GPU MB |", "|---|---|---|---|---|---|"]
    for row in report["training"]:
        lines.append(f"| {row['run']} | {row.get('skipped') or row['returncode']} | {row['steps']} | {_num(row['steps_per_s'], '.2f')} "
                     f"| {row['wall_s']:.0f} | {_mb(row['peak_gpu_memory_bytes'])} |")
    lines += ["", f"Total: {report['total_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes: checks the structure in about a minute on a CPU")
    parser.add_argument("--batch", type=int, default=None, help="inference batch (default 64; tiny 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per inference setting (default 10; tiny 2)")
    parser.add_argument("--train-steps", type=int, default=None, help="optimizer steps per training run (default 200; tiny 4)")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default 32 as the paper; tiny 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled inference rows")
    parser.add_argument("--timeout", type=int, default=120, help="seconds allowed per training run")
    parser.add_argument("--budget", type=int, default=450, help="seconds for the whole check: training runs that would end later are skipped")
    args = parser.parse_args(argv)
    device, tiny = torch.device(args.device), args.tiny
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {"environment": environment(device)}
    report["inference"] = run_inference(tiny, device, args.batch or (2 if tiny else 64), args.repeats or (2 if tiny else 10),
                                        compile_purifier=not args.no_compile)
    steps, batch = args.train_steps or (4 if tiny else 200), args.train_batch or (2 if tiny else 32)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "data", n=max(4 * batch, 8), size=32 if tiny else 224)
        report["training"] = training_runs(tiny, device, steps, batch, data, Path(tmp), args.timeout, start + args.budget)
    report["total_s"] = time.perf_counter() - start
    _write_atomic(out / "gpu_check.json", json.dumps(report, indent=1))
    _write_atomic(out / "gpu_check.md", to_markdown(report))
    print(to_markdown(report))
    return 0 if all(row["returncode"] in (0, None) for row in report["training"]) else 1


if __name__ == "__main__":
    sys.exit(main())
