"""The ``impure`` command. Each subcommand lives beside the code it drives: a module listed in
``_SUBCOMMAND_MODULES`` exposes ``add_parser(subparsers)``, which registers its subcommand(s)
with ``set_defaults(func=...)``; ``func(args)`` returns an exit code."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Optional

_SUBCOMMAND_MODULES = (
    "impure_hf.data",
    "impure_hf.train",
    "impure_hf.finetuning",
    "impure_hf.evaluate",
    "impure_hf.hub",
    "impure_hf.demo",
    "impure_hf.bench",
    "impure_hf.app",
    "impure_hf.export",
)

def _purify(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image, UnidentifiedImageError
    from tqdm.auto import tqdm

    from .data import iter_image_files
    from .hub import load_purifier
    from .image_processing_impure import ImpureImageProcessor

    files = iter_image_files(args.inputs)
    model = load_purifier(args.model, device=args.device)
    processor = ImpureImageProcessor(crop_size=args.size or model.config.image_size)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    skipped = 0
    for path in tqdm(files, desc="purifying", unit="img"):
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError) as err:
            print(f"skipping {path}: cannot decode ({err})", file=sys.stderr)
            skipped += 1
            continue
        pixels = processor(image)["pixel_values"].to(args.device)
        purified = model.purify(pixels, generator=generator)
        processor.post_process(purified)[0].save(out_dir / f"{path.stem}_purified.png")
    print(f"purified {len(files) - skipped} image(s) into {out_dir}" + (f", skipped {skipped}" if skipped else ""))
    return 0 if skipped < len(files) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="impure", description="IMPure adversarial purification")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    purify = sub.add_parser("purify", help="purify image files and folders")
    purify.add_argument("inputs", nargs="+", help="image files or folders")
    purify.add_argument("--out", required=True, help="output folder (PNG files)")
    purify.add_argument("--model", default=None, help="preset name, saved folder or Hub id (default: embedded model)")
    purify.add_argument("--seed", type=int, default=0, help="seed of the purifier's noise")
    purify.add_argument("--size", type=int, default=None, help="crop size (default: the model's image_size)")
    purify.add_argument("--device", default="cpu")
    purify.set_defaults(func=_purify)
    for name in _SUBCOMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:  # modules of later features may not exist yet
            module = importlib.import_module(name)
            if hasattr(module, "add_parser"):
                module.add_parser(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
