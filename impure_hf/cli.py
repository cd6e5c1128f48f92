"""The ``impure`` command. Each subcommand lives beside the code it drives: a module listed in
``_SUBCOMMAND_MODULES`` exposes ``add_parser(subparsers)``, which registers its subcommand(s)
with ``set_defaults(func=...)``; ``func(args)`` returns an exit code."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
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
    from .purify import run_from_args  # file handling, naming and the summary live in purify.py

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="impure", description="IMPure adversarial purification")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    purify = sub.add_parser("purify", help="purify image files and folders")
    purify.add_argument("inputs", nargs="+", help="image files or folders")
    purify.add_argument("--out", required=True, help="output folder (PNG files; input subfolders are mirrored)")
    purify.add_argument("--model", default=None, help="preset name, saved folder or Hub id (default: embedded model)")
    purify.add_argument("--seed", type=int, default=0, help="seed of the purifier's noise")
    purify.add_argument("--size", type=int, default=None, help="crop size (default: the model's image_size)")
    purify.add_argument("--device", default="cpu")
    purify.add_argument("--overwrite", action="store_true", help="replace existing output files (default: keep them)")
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
