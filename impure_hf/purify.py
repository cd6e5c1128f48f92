"""``impure purify``: purify image files and folders into PNG files, losing nothing.

- Output names mirror the input folders (``in/sub/x.jpg`` -> ``out/sub/x_purified.png``; with
  several inputs, under each input's name) and stay unique: ``a.png`` and ``a.jpg`` beside each
  other become ``a_png_purified.png`` and ``a_jpg_purified.png``.
- A file this run did not write is never overwritten unless ``overwrite=True`` (``--overwrite``);
  its input is reported as kept. Outputs carry a PNG text marker, so earlier outputs found among
  the inputs (``--out`` inside or equal to an input folder) are skipped, never purified again.
- Every PIL mode is read by ``image_processing_impure.to_pil_rgb`` (EXIF orientation, 16-bit and
  float by their range, alpha on white, palette, CMYK), the one conversion the processor uses.
- A file that cannot be decoded (truncated, empty, not an image, larger than PIL's decompression-bomb
  limit) is skipped with one line; the run goes on, ends with a summary and returns 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from tqdm.auto import tqdm

from ._utils import IMAGE_SUFFIXES, atomic_save_with
from .image_processing_impure import ImpureImageProcessor, to_pil_rgb
from .loading import load_purifier
from .precision import DTYPES, set_precision

PURIFY_SUFFIXES = IMAGE_SUFFIXES | {".gif"}  # GIF: the first frame
OUTPUT_SUFFIX = "_purified.png"
MARKER = "impure-purify"  # PNG text key written into every output


@dataclass
class PurifySummary:
    """What one run did: paths written, inputs kept (output existed), skipped (earlier outputs) and failed."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)

    def line(self, out: Path) -> str:
        parts = [f"purified {len(self.written)} image(s) into {out}"]
        if self.kept:
            parts.append(f"{len(self.kept)} kept: output exists and was not written by this run (--overwrite replaces it)")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped: earlier outputs of impure purify")
        if self.failed:
            parts.append(f"{len(self.failed)} failed: " + ", ".join(str(p) for p, _ in self.failed))
        if self.ignored:
            parts.append(f"{len(self.ignored)} non-image file(s) ignored")
        return "; ".join(parts)


def plan_outputs(inputs: Sequence[Union[str, Path]], out: Union[str, Path]) -> tuple[dict[Path, Path], list[Path]]:
    """{input file: output path} with mirrored subfolders and unique names, and the ignored files.

    Raises ``FileNotFoundError`` for an input that does not exist or a folder without images.
    """
    out = Path(out)
    several = len(inputs) > 1
    wanted: list[tuple[Path, Path]] = []  # (file, output folder)
    ignored: list[Path] = []
    for given in map(Path, inputs):
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.is_file() and not p.name.startswith("."))
            images = [p for p in files if p.suffix.lower() in PURIFY_SUFFIXES]
            ignored += [p for p in files if p.suffix.lower() not in PURIFY_SUFFIXES]
            if not images:
                raise FileNotFoundError(f"no image files in folder {given}")
            base = out / given.resolve().name if several else out
            wanted += [(p, base / p.parent.relative_to(given)) for p in images]
        elif given.is_file():
            wanted.append((given, out))
        else:
            raise FileNotFoundError(f"no such image file or folder: {given}")
    # one name per output; names that clash keep their extension, then a counter
    plan: dict[Path, Path] = {}
    by_target: dict[Path, list[Path]] = {}
    for path, folder in wanted:
        by_target.setdefault(folder / f"{path.stem}{OUTPUT_SUFFIX}", []).append(path)
    taken = {target for target, paths in by_target.items() if len(paths) == 1}
    for target, paths in by_target.items():
        if len(paths) == 1:
            plan[paths[0]] = target
            continue
        for path in paths:
            stem = f"{path.stem}_{path.suffix.lstrip('.').lower()}"
            candidate, n = target.with_name(f"{stem}{OUTPUT_SUFFIX}"), 2
            while candidate in taken:
                candidate, n = target.with_name(f"{stem}_{n}{OUTPUT_SUFFIX}"), n + 1
            taken.add(candidate)
            plan[path] = candidate
    return plan, ignored


def _is_our_output(image: Image.Image) -> bool:
    return image.format == "PNG" and MARKER in image.info


def purify_files(
    inputs: Sequence[Union[str, Path]],
    out: Union[str, Path],
    model,
    processor: ImpureImageProcessor,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    log=None,
) -> PurifySummary:
    """Purify every image of ``inputs`` into ``out`` (see the module's docstring); returns what happened.

    ``model`` is an ``ImpureModel`` (its device is used), ``processor`` the crop rule; ``log``
    receives one line per skipped or failed file (default: standard error).
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    plan, ignored = plan_outputs(inputs, out)
    summary = PurifySummary(ignored=ignored)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    written: set[Path] = set()
    for path, target in tqdm(plan.items(), desc="purifying", unit="img", disable=not progress):
        try:
            with Image.open(path) as image:
                if _is_our_output(image):
                    summary.skipped.append(path)
                    continue
                image.load()
                rgb = to_pil_rgb(image)
        except (Image.DecompressionBombError, UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            # SyntaxError: PIL's parsers raise it for some malformed headers
            reason = "larger than PIL's decompression-bomb limit" if isinstance(err, Image.DecompressionBombError) else "cannot decode"
            log(f"skipping {path}: {reason} ({err})")
            summary.failed.append((path, str(err)))
            continue
        if target.exists() and target not in written and not overwrite:
            log(f"keeping {target}: it exists and was not written by this run (--overwrite replaces it)")
            summary.kept.append(path)
            continue
        try:
            pixels = processor(rgb)["pixel_values"].to(device)
            purified = model.purify(pixels, generator=generator)
            result = processor.post_process(purified)[0]
            info = PngImagePlugin.PngInfo()
            info.add_text(MARKER, str(path.name))
            atomic_save_with(target, lambda temporary: result.save(temporary, format="PNG", pnginfo=info))
        except (ValueError, RuntimeError, OSError) as err:
            log(f"failed {path}: {err}")
            summary.failed.append((path, str(err)))
            continue
        written.add(target)
        summary.written.append(target)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--out", required=True, help="output folder (PNG files; input subfolders are mirrored)")
    parser.add_argument("--model", default=None, help="preset name, saved folder or Hub id (default: embedded model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the purifier's noise")
    parser.add_argument("--size", type=int, default=None, help="crop size (default: the model's image_size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (default: keep them)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="precision: auto (bf16 autocast only where measured faster on this machine; default), fp32 or bf16")


def run(args: argparse.Namespace) -> int:
    """``impure purify``: one line per problem, a summary, exit 1 on any failure."""
    if args.size is not None and args.size <= 0:
        print(f"impure purify: --size must be a positive integer, got {args.size}", file=sys.stderr)
        return 2
    try:
        plan_outputs(args.inputs, args.out)  # missing inputs fail before the model loads
        model = load_purifier(args.model, device=args.device)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"impure purify: {err}", file=sys.stderr)
        return 2
    print(set_precision(model, getattr(args, "dtype", "auto"), image_size=args.size), flush=True)
    processor = ImpureImageProcessor(crop_size=args.size or model.config.image_size)
    summary = purify_files(
        args.inputs, args.out, model, processor, seed=args.seed, overwrite=getattr(args, "overwrite", False)
    )
    print(summary.line(Path(args.out)))
    return 1 if summary.failed else 0


__all__ = ["PurifySummary", "plan_outputs", "purify_files", "add_arguments", "run", "MARKER", "OUTPUT_SUFFIX"]
