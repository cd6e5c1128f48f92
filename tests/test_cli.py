"""The one `impure` command has every subcommand the README documents."""

import re
from pathlib import Path

from impure_hf.cli import build_parser


def test_every_documented_subcommand_is_registered():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = set(re.findall(r"`impure ([a-z-]+)", readme))
    registered = set(build_parser()._subparsers._group_actions[0].choices)
    assert documented <= registered, f"documented but not registered: {sorted(documented - registered)}"
    assert {"purify", "demo", "make-dataset", "train", "finetune", "evaluate", "convert", "publish", "bench", "app"} <= registered
