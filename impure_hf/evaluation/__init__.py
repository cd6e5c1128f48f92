"""Evaluation, one concern per module:

- ``settings``: [`EvalSettings`], the one dataclass of an evaluation's settings (function
  arguments, cache keys, the report's ``config`` and the command's flags), and the threat models;
- ``images``: the images to evaluate on ([`load_eval_images`]);
- ``harness``: [`evaluate`], the cached and sharded loop over classifiers, threat models, attacks
  and defences;
- ``reports``: markdown, CSV, JSON, bar chart and image panels;
- ``command``: ``impure evaluate`` (``add_arguments`` / ``run``, wired in ``impure_hf/cli.py``).

The defended model is ``impure_hf.defended``; the attacks, adaptive ones included, ``impure_hf.attacks``.
"""

from ..attacks import ADAPTIVE_ATTACKS
from .command import add_arguments, run, settings_from_args
from .harness import evaluate
from .images import EvalImages, load_eval_images
from .reports import CSV_FIELDS, render_markdown, write_reports
from .settings import THREAT_MODELS, EvalSettings

__all__ = [
    "ADAPTIVE_ATTACKS",
    "CSV_FIELDS",
    "THREAT_MODELS",
    "EvalImages",
    "EvalSettings",
    "add_arguments",
    "evaluate",
    "load_eval_images",
    "render_markdown",
    "run",
    "settings_from_args",
    "write_reports",
]
