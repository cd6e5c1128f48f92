"""Speed and memory of the purifier, measured beside timm's ViT-B/16 in the same run (``impure bench``).

Timings are medians over interleaved repeats (configurations take turns), because repeat-to-repeat
noise on shared CPUs is 20-30 %: only ratios measured in one run are meaningful. Peak memory is
measured in a fresh subprocess per setting (peak RSS above the loaded model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .modeling_impure import ImpureModel


@dataclass
class Setting:
    """One row of the table: how the purifier (or the ViT-B reference) is run."""

    name: str
    model: str  # "purifier" or "vit_b"
    chunk: Optional[int] = None  # decoder_chunk_size; None = the model's default
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)
    sdpa: bool = True
    compile: bool = False
    times: list = field(default_factory=list)


def _autocast(dtype: str, device: torch.device):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _vit_b(device):
    import timm

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
    calls = {}
    for s in settings:
        if s.model == "vit_b":
            module = vit
            fn = lambda m=module: m(x)
        else:
            module = purifier
            fn = lambda m=module, s=s: m(x, generator=generator)
        if s.compile:
            module = torch.compile(module)
            fn = (lambda m=module: m(x)) if s.model == "vit_b" else (lambda m=module: m(x, generator=generator))

        def call(fn=fn, s=s):
            purifier.config.decoder_chunk_size = s.chunk
            purifier.set_attention_implementation(sdpa=s.sdpa)
            with torch.inference_mode(), _autocast(s.dtype, device):
                fn()

        call()  # warm-up (and compilation)
        calls[s.name] = call
    for _ in range(repeats):
        for s in settings:
            _sync(device)
            start = time.perf_counter()
            calls[s.name]()
            _sync(device)
            s.times.append(time.perf_counter() - start)
    purifier.config.decoder_chunk_size = None
    purifier.set_attention_implementation(sdpa=True)
    flops = {
        "purifier": count_flops(lambda: purifier(x[:1], generator=generator)) * batch,
        "vit_b": count_flops(lambda: vit(x[:1])) * batch,
    }
    return {"flops": flops, "median_s": {s.name: statistics.median(s.times) for s in settings}}


_MEMORY_SCRIPT = """
import sys, torch
from impure_hf import ImpureModel

def status(key):  # kB values from /proc/self/status
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))

torch.set_grad_enabled(False)
preset, batch, chunk, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
model = ImpureModel.from_preset(preset).eval()
if chunk != "default":
    model.config.decoder_chunk_size = None if chunk == "all" else int(chunk)
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


def run_benchmark(
    presets=("impure-vit-b", "impure-vit-tiny"),
    batches=(1, 8, 32),
    memory_batches=(64,),
    repeats: int = 5,
    device: str = "cpu",
    with_compile: bool = False,
    out_dir: Optional[str] = None,
) -> list[dict]:
    dev = torch.device(device)
    peak = matmul_flops_per_s(dev)
    rows = []
    for preset in presets:
        for batch in batches:
            settings = [
                Setting("purifier default", "purifier"),
                Setting("decoder: all subsets in one call", "purifier", chunk=4),
                Setting("decoder: 2 subsets per call", "purifier", chunk=2),
                Setting("decoder: per-subset loop", "purifier", chunk=1),
                Setting("purifier eager attention", "purifier", sdpa=False),
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
                flops = result["flops"][s.model]
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
    summary = {"matmul_gflop_per_s": peak / 1e9, "rows": rows, "torch": torch.__version__}
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "bench_purify.json").write_text(json.dumps(summary, indent=1))
        Path(out_dir, "bench_purify.md").write_text(to_markdown(summary))
    print(to_markdown(summary))
    return rows


def _fmt(row: dict) -> str:
    return (
        f"{row['preset']:>16} batch {row['batch']:>3}  {row['setting']:<34} {row['ms_per_image']:9.1f} ms/img "
        f"{row['time_vs_vit_b']:5.2f}x ViT-B  FLOP/s vs matmul {row['flops_per_s_vs_matmul']:.2f}"
    )


def to_markdown(summary: dict) -> str:
    lines = [
        f"Large fp32 matmul (4096^2): {summary['matmul_gflop_per_s']:.0f} GFLOP/s; torch {summary['torch']}",
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
    return "\n".join(lines) + "\n"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark the purifier against timm ViT-B/16")
    parser.add_argument("--presets", nargs="+", default=["impure-vit-b", "impure-vit-tiny"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--memory-batches", nargs="*", type=int, default=[64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--out", default=None, help="folder for bench_purify.json / .md")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    run_benchmark(args.presets, args.batches, args.memory_batches, args.repeats, args.device, args.compile, args.out)
    return 0
