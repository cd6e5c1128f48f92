"""``impure evaluate``: its flags are the fields of [`EvalSettings`], made by
``transformers.HfArgumentParser`` (``--field-name``, ``--no-<bool>``, help from the field)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import get_type_hints

from transformers import HfArgumentParser

from .._utils import parse_eps, process_state
from ..loading import DEFAULT_MODEL
from .harness import evaluate
from .reports import render_markdown
from .settings import EvalSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``impure evaluate``: one per ``EvalSettings`` field, plus ``--no-purifier``."""
    hints = get_type_hints(EvalSettings)
    for f in dataclasses.fields(EvalSettings):
        # what HfArgumentParser does for each field of its dataclasses, here on the subcommand's parser
        HfArgumentParser._parse_dataclass_field(parser, _resolved(f, hints))
    actions = {a.dest: a for a in parser._actions}
    actions["eps"].type = parse_eps  # also "16/255"
    actions["out_dir"].required = True  # the command always writes its reports
    parser.add_argument("--no-purifier", action="store_true", help="evaluate the baselines only")
    # the flags' earlier spellings
    parser.add_argument("--no-round", dest="round_adversarial", action="store_false", help=argparse.SUPPRESS)
    parser.add_argument("--all-images", dest="correct_only", action="store_false", help=argparse.SUPPRESS)


def _resolved(f: dataclasses.Field, hints: dict) -> dataclasses.Field:
    """A copy of the field with its type resolved (``from __future__ import annotations`` leaves text)."""
    copy = dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)
    copy.name, copy.type = f.name, hints[f.name]
    return copy


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The ``EvalSettings`` of parsed flags: the embedded purifier unless ``--no-purifier``, 'none' baselines."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSettings)}
    values["purifier"] = None if args.no_purifier else values["purifier"] or DEFAULT_MODEL
    if values["baselines"] == ["none"]:
        values["baselines"] = []
    return EvalSettings(**values)


def run(args: argparse.Namespace) -> int:
    """``impure evaluate``."""
    settings = settings_from_args(args)
    if settings.purifier == DEFAULT_MODEL and not (Path(DEFAULT_MODEL) / "config.json").exists():
        print(
            f"error: no embedded default model in this installation ({DEFAULT_MODEL}); pass --purifier "
            "NAME|FOLDER|HUB_ID, or --no-purifier to evaluate the baselines only",
            file=sys.stderr,
        )
        return 2
    try:
        results = evaluate(settings=settings)
    except (ValueError, FileNotFoundError) as err:  # bad names, settings or data: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if process_state().is_main_process:
        print(render_markdown(results))
        panels = ", panels/" if settings.panels and (Path(settings.out_dir) / "panels").is_dir() else ""  # --panels 0 writes none
        print(f"\nwrote {Path(settings.out_dir) / 'results.md'}, results.csv, results.json, accuracy.png{panels}")
    return 0


__all__ = ["add_arguments", "run", "settings_from_args"]
