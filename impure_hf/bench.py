"""Speed and memory of the purifier, measured beside timm's ViT-B/16 in the same run (``impure bench``).

Timings are medians over interleaved repeats (configurations take turns), because repeat-to-repeat
noise on shared CPUs is 20-30 %: only ratios measured in one run are meaningful. Peak memory is
measured in a fresh subprocess per setting (peak RSS above the loaded model).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from .attacks import ATTACKS, attack_images, make_attack
from .classifiers import load_classifier
from .evaluation import load_eval_images
from .loading import load_purifier
from .losses import PerceptualLoss, PurificationLoss, RandomCombination
from .modeling_impure import ImpureModel
from ._utils import atomic_write_json, atomic_write_text


SECTIONS = ("inference", "training", "bf16", "attacks")


@dataclass
class Setting:
    """One row of the table: how the purifier (or the ViT-B reference) is run."""

    name: str
    model: str  # "purifier" or "vit_b"
    chunk: Optional[int] = None  # decoder_chunk_size; None = the model's default
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)
    sdpa: bool = True
    compile: bool = False
    channels_last: bool = False  # conv parts (patch embedding, refinement) and the input in NHWC
    image_mask: Optional[str] = None  # another masking mode than the preset's (a separate model)


def _autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _interleaved_times(calls: dict, repeats: int, device: torch.device) -> dict:
    """Seconds per call, ``repeats`` rounds of every call in turn (interleaved, so that a slow
    spell of the machine hits every setting alike); the calls are already warmed up."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def matmul_flops_per_s(device: torch.device, size: int = 4096, dtype=torch.float32, repeats: int = 5) -> float:
    """The machine's practical peak: FLOP/s of a large square matmul."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _vit_b(device):
    return timm.create_model("vit_base_patch16_224", pretrained=False).to(device).eval()


def _purifier(preset: str, device):
    return ImpureModel.from_preset(preset).to(device).eval()


def time_settings(
    preset: str, batch: int, settings: list[Setting], repeats: int, device: torch.device, image_size: int = 224
) -> dict:
    """Interleaved medians (seconds per call) for each setting at one batch size."""
    purifier, vit = _purifier(preset, device), _vit_b(device)
    x = torch.rand(batch, 3, image_size, image_size, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    calls, flop_counts = {}, {}
    for s in settings:
        if s.model == "vit_b":
            module = vit
            fn = lambda m=module: m(x)
        elif s.image_mask is not None:
            module = ImpureModel.from_preset(preset, image_mask=s.image_mask).to(device).eval()
            fn = lambda m=module: m(x, generator=generator)
            flop_counts[s.name] = count_flops(lambda m=module: m(x[:1], generator=generator)) * batch
        elif s.channels_last:
            module = copy.deepcopy(purifier).to(memory_format=torch.channels_last)
            x_nhwc = x.contiguous(memory_format=torch.channels_last)
            fn = lambda m=module: m(x_nhwc, generator=generator)
        else:
            module = purifier
            fn = lambda m=module, s=s: m(x, generator=generator)
        if s.compile:
            module = torch.compile(module)
            fn = (lambda m=module: m(x)) if s.model == "vit_b" else (lambda m=module: m(x, generator=generator))

        def call(fn=fn, s=s):
            purifier.config.decoder_chunk_size = s.chunk
            purifier.set_attn_implementation("sdpa" if s.sdpa else "eager")
            with torch.inference_mode(), _autocast(s.dtype, device):
                fn()

        call()  # warm-up (and compilation)
        calls[s.name] = call
    times = _interleaved_times(calls, repeats, device)
    purifier.config.decoder_chunk_size = None
    purifier.set_attn_implementation("sdpa")
    per_model = {
        "purifier": count_flops(lambda: purifier(x[:1], generator=generator)) * batch,
        "vit_b": count_flops(lambda: vit(x[:1])) * batch,
    }
    flops = {s.name: flop_counts.get(s.name, per_model[s.model]) for s in settings}
    return {"flops": flops, "median_s": {name: statistics.median(t) for name, t in times.items()}}


_MEMORY_SCRIPT = """
import sys, torch
from impure_hf import ImpureModel

def status(key):  # kB values from /proc/self/status
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))

torch.set_grad_enabled(False)
preset, batch, chunk, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
model = ImpureModel.from_preset(preset).eval()
if chunk != "default":
    model.config.decoder_chunk_size = model.config.num_subsets if chunk == "all" else int(chunk)
x = torch.rand(batch, 3, size, size)
model(x[:1], generator=torch.Generator().manual_seed(0))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS:")
model(x, generator=torch.Generator().manual_seed(0))
print((status("VmHWM:") - base) / 1024)
"""


def peak_memory_mb(preset: str, batch: int, chunk: str = "default", image_size: int = 224) -> float:
    """Peak resident memory (MB) a CPU forward adds above the loaded model (Linux /proc)."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, preset, str(batch), chunk, str(image_size)],
        check=True, capture_output=True, text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- training
_TRAINING_MEMORY_SCRIPT = """
import sys, torch
from impure_hf.bench import training_step

def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))

step = training_step(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
step()
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS:")
step()
print((status("VmHWM:") - base) / 1024)
"""


def training_step(
    preset: str, batch: int, loss: str = "l1", image_size: int = 224, device: str = "cpu", **overrides
) -> Callable[[], None]:
    """One optimizer step (forward, IMPure loss, backward, AdamW) on random images, as a callable.

    ``loss``: ``"l1"`` (pixel loss only), ``"vgg19"`` (the paper's perceptual loss, random VGG19
    weights: the cost is the same) or ``"classifier"`` (EfficientNet-Lite0's own features, the
    flexible perceptual loss), both with RCM.
    """
    dev = torch.device(device)
    model = ImpureModel.from_preset(preset, **overrides).to(dev).train()
    perceptual = None
    if loss == "vgg19":
        perceptual = PerceptualLoss.vgg19(weights=None)
    elif loss == "classifier":
        perceptual = PerceptualLoss.from_classifier(load_classifier("efficientnet_lite0"))
    elif loss != "l1":
        raise ValueError(f"loss must be 'l1', 'vgg19' or 'classifier', got {loss!r}")
    rcm = RandomCombination(model.config.patch_size) if perceptual is not None else None
    objective = PurificationLoss(model.config.image_mean, model.config.image_std, perceptual, rcm).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clean = torch.rand(batch, 3, image_size, image_size, device=dev)
    adversarial = (clean + 0.06 * torch.rand_like(clean) - 0.03).clamp(0, 1)
    generator = torch.Generator(device=dev).manual_seed(0)

    def step() -> None:
        out = model(adversarial, generator=generator)
        objective(out.reconstruction, clean, adversarial, generator=generator)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.model = model  # for inspection
    return step


def run_training_benchmark(presets, batch: int, losses=("l1", "vgg19", "classifier"), repeats: int = 3, device: str = "cpu") -> list[dict]:
    """Seconds per optimizer step (interleaved medians) and, on CPU, peak memory above the model."""
    rows = []
    for preset in presets:
        steps = {loss: training_step(preset, batch, loss, device=device) for loss in losses}
        for loss in losses:
            steps[loss]()  # warm-up
        times = _interleaved_times(steps, repeats, torch.device(device))
        del steps
        for loss in losses:
            seconds = statistics.median(times[loss])
            row = {"device": device, "preset": preset, "batch": batch, "setting": f"training step, loss {loss}",
                   "s_per_step": seconds, "images_per_hour": 3600 * batch / seconds}
            if device == "cpu":
                out = subprocess.run([sys.executable, "-c", _TRAINING_MEMORY_SCRIPT, preset, str(batch), loss, "224"],
                                     check=True, capture_output=True, text=True)
                row["peak_mb_above_model"] = float(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{preset:>16} batch {batch:>3}  training step, loss {loss:<10} {seconds:7.2f} s/step "
                  f"{row['images_per_hour']:8.0f} img/h  {row.get('peak_mb_above_model', float('nan')):6.0f} MB", flush=True)
    return rows


# ---------------------------------------------------------------------------------- bf16 agreement
def bf16_agreement(model: Optional[str] = None, classifier: str = "efficientnet_lite0", seed: int = 0) -> dict:
    """Purify foolbox's 20 labelled ImageNet photos in fp32 and under bf16 autocast (CPU).

    Returns the PSNR between the two purified versions and how many of the classifier's
    predictions on them differ; ``model`` defaults to the embedded purifier (trained weights,
    so the comparison means something).
    """
    purifier, net = load_purifier(model), load_classifier(classifier)
    images = load_eval_images(image_size=purifier.config.image_size).pixel_values
    outputs = {}
    for dtype in ("fp32", "bf16"):
        generator = torch.Generator().manual_seed(seed)
        with torch.inference_mode(), _autocast(dtype, torch.device("cpu")):
            outputs[dtype] = torch.cat([purifier(images[i : i + 4], generator=generator).purified_pixel_values.float() for i in range(0, len(images), 4)])
    with torch.inference_mode():
        predictions = {dtype: net(out).argmax(dim=-1) for dtype, out in outputs.items()}
    mse = (outputs["fp32"] - outputs["bf16"]).pow(2).flatten(1).mean(dim=1)
    return {
        "model": str(model or "embedded default"),
        "images": len(images),
        "psnr_bf16_vs_fp32_db": float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean()),
        "predictions_changed": int((predictions["fp32"] != predictions["bf16"]).sum()),
    }


# ---------------------------------------------------------------------------------- data and evaluation
def attack_throughput(attacks=None, classifier: str = "efficientnet_lite0", batch: int = 16, seed: int = 0) -> list[dict]:
    """Images/s of crafting each attack against ``classifier`` at 224 px (the dataset builder's
    and the black-box evaluation's inner loop), on foolbox's photos."""
    net = load_classifier(classifier)
    data = load_eval_images(max_images=batch)
    images, labels = data.pixel_values, data.labels
    rows = []
    for name in attacks or list(ATTACKS):
        attack = make_attack(name, net)
        start = time.perf_counter()
        attack_images(attack, images, labels, seed=seed)
        seconds = time.perf_counter() - start
        rows.append({"setting": f"attack {name}", "classifier": classifier, "images_per_s": len(images) / seconds})
        print(f"attack {name:<9} on {classifier}: {len(images) / seconds:7.2f} images/s", flush=True)
    return rows


def run_benchmark(
    presets=("impure-vit-b", "impure-vit-tiny"),
    batches=(1, 8, 32),
    memory_batches=(64,),
    repeats: int = 5,
    device: str = "cpu",
    with_compile: bool = False,
    out_dir: Optional[str] = None,
    sections=SECTIONS,
    training_batch: int = 8,
) -> list[dict]:
    """Every table of benchmarks/README.md in one run; ``sections`` picks a subset."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown benchmark section(s) {sorted(unknown)}; choose from {SECTIONS}")
    dev = torch.device(device)
    peak = matmul_flops_per_s(dev)
    rows, extra = [], {}
    for preset in presets if "inference" in sections else ():
        for batch in batches:
            settings = [
                Setting("purifier default", "purifier"),
                Setting("decoder: all subsets in one call", "purifier", chunk=4),
                Setting("decoder: 2 subsets per call", "purifier", chunk=2),
                Setting("decoder: per-subset loop", "purifier", chunk=1),
                Setting("purifier eager attention", "purifier", sdpa=False),
                Setting("purifier channels-last", "purifier", channels_last=True),
                # occlusion masking encodes the image once; ImgNoise (the default) encodes it twice
                Setting("purifier, occlusion masking", "purifier", image_mask="occlude"),
                Setting("purifier bf16 autocast", "purifier", dtype="bf16"),
                Setting("ViT-B/16 fp32", "vit_b"),
                Setting("ViT-B/16 bf16 autocast", "vit_b", dtype="bf16"),
            ]
            if with_compile:
                settings.append(Setting("purifier torch.compile", "purifier", compile=True))
            result = time_settings(preset, batch, settings, repeats, dev)
            vit_fp32 = result["median_s"]["ViT-B/16 fp32"]
            vit_bf16 = result["median_s"]["ViT-B/16 bf16 autocast"]
            for s in settings:
                seconds = result["median_s"][s.name]
                flops = result["flops"][s.name]
                reference = vit_bf16 if s.dtype == "bf16" else vit_fp32
                row = {
                    "device": device,
                    "preset": preset,
                    "batch": batch,
                    "setting": s.name,
                    "ms_per_image": 1000 * seconds / batch,
                    "images_per_s": batch / seconds,
                    "time_vs_vit_b": seconds / reference,
                    "gflop_per_image": flops / batch / 1e9,
                    "flops_per_s_vs_matmul": flops / seconds / peak if s.dtype == "fp32" else float("nan"),
                }
                rows.append(row)
                print(_fmt(row), flush=True)
        if device == "cpu":
            for batch in memory_batches:
                for chunk in ("default", "all", "1"):
                    mb = peak_memory_mb(preset, batch, chunk)
                    rows.append({"device": device, "preset": preset, "batch": batch, "setting": f"memory, decoder chunk={chunk}", "peak_mb_above_model": mb})
                    print(f"{preset:>16} batch {batch:>3}  memory decoder chunk={chunk:<8} {mb:8.0f} MB above the model", flush=True)
    if "training" in sections:
        extra["training"] = run_training_benchmark(presets, training_batch, device=device)
    if "bf16" in sections and device == "cpu":
        extra["bf16"] = bf16_agreement()
        print(f"bf16 vs fp32 on {extra['bf16']['images']} photos: PSNR {extra['bf16']['psnr_bf16_vs_fp32_db']:.1f} dB, "
              f"{extra['bf16']['predictions_changed']} prediction(s) changed", flush=True)
    if "attacks" in sections:
        extra["attacks"] = attack_throughput()
    summary = {"matmul_gflop_per_s": peak / 1e9, "rows": rows, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "device_name": _device_name(dev),
               "cpu_flags": _cpu_flags() if dev.type == "cpu" else None, **extra}
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(out_dir, "bench_purify.json"), summary, indent=1)
        atomic_write_text(Path(out_dir, "bench_purify.md"), to_markdown(summary))
    print(to_markdown(summary))
    return rows


def _fmt(row: dict) -> str:
    return (
        f"{row['preset']:>16} batch {row['batch']:>3}  {row['setting']:<34} {row['ms_per_image']:9.1f} ms/img "
        f"{row['time_vs_vit_b']:5.2f}x ViT-B  FLOP/s vs matmul {row['flops_per_s_vs_matmul']:.2f}"
    )


def to_markdown(summary: dict) -> str:
    lines = [
        f"{summary.get('device_name', '')}{_flags_text(summary.get('cpu_flags'))}: large fp32 matmul (4096^2) {summary['matmul_gflop_per_s']:.0f} GFLOP/s; "
        f"torch {summary['torch']}, {summary.get('threads', '?')} threads",
        "",
        "| preset | batch | setting | ms/image | images/s | time / ViT-B (same dtype) | GFLOP/image | FLOP/s / matmul |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        if "ms_per_image" in r:
            lines.append(
                f"| {r['preset']} | {r['batch']} | {r['setting']} | {r['ms_per_image']:.1f} | {r['images_per_s']:.2f} | "
                f"{r['time_vs_vit_b']:.2f} | {r['gflop_per_image']:.1f} | {r['flops_per_s_vs_matmul']:.2f} |"
            )
    memory = [r for r in summary["rows"] if "peak_mb_above_model" in r]
    if memory:
        lines += ["", "| preset | batch | setting | peak MB above the model |", "|---|---|---|---|"]
        lines += [f"| {r['preset']} | {r['batch']} | {r['setting']} | {r['peak_mb_above_model']:.0f} |" for r in memory]
    if summary.get("training"):
        lines += ["", "| preset | batch | training step (forward, loss, backward, AdamW) | s/step | images/hour | peak MB above the model |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['preset']} | {r['batch']} | {r['setting']} | {r['s_per_step']:.2f} | {r['images_per_hour']:.0f} | "
                  f"{r.get('peak_mb_above_model', float('nan')):.0f} |" for r in summary["training"]]
    if summary.get("bf16"):
        b = summary["bf16"]
        lines += ["", f"bf16 autocast vs fp32, {b['model']} on {b['images']} labelled photos: PSNR between the two purified "
                  f"versions {b['psnr_bf16_vs_fp32_db']:.1f} dB; classifier predictions changed: {b['predictions_changed']} of {b['images']}."]
    if summary.get("attacks"):
        lines += ["", "| attack (224 px, EfficientNet-Lite0) | images/s |", "|---|---|"]
        lines += [f"| {r['setting']} | {r['images_per_s']:.2f} |" for r in summary["attacks"]]
    return "\n".join(lines) + "\n"


BF16_CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # what decides whether bf16 autocast pays on a CPU


def _cpu_flags() -> list[str]:
    """The CPU's bf16-relevant flags: bf16 autocast was 3x faster than fp32 with avx512_bf16 on one
    AMD EPYC and slower than fp32 on an Intel Xeon, so a figure names them."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in BF16_CPU_FLAGS if f in flags]


def _flags_text(flags: Optional[list]) -> str:
    if flags is None:  # a GPU, or a summary from before the flags were recorded
        return ""
    return f" (CPU flags: {' '.join(flags) if flags else 'none of ' + ', '.join(BF16_CPU_FLAGS)})"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "cpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``impure bench``."""
    parser.add_argument("--presets", nargs="+", default=["impure-vit-b", "impure-vit-tiny"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--memory-batches", nargs="*", type=int, default=[64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--out", default=None, help="folder for bench_purify.json / .md")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="inference (speed, FLOP/s, memory), training steps, bf16 agreement, attack throughput")
    parser.add_argument("--training-batch", type=int, default=8)


def run(args: argparse.Namespace) -> int:
    """``impure bench``."""
    run_benchmark(args.presets, args.batches, args.memory_batches, args.repeats, args.device, args.compile, args.out,
                  args.sections, args.training_batch)
    return 0
