"""Old import path, kept for users' code: the evaluation lives in the ``impure_hf.evaluation``
package, the defended model in ``impure_hf.defended``, the adaptive attacks in ``impure_hf.attacks``."""

from .attacks import ADAPTIVE_ATTACKS, make_adaptive_attack
from .defended import PurifiedClassifier, amplified_perturbation, is_stochastic, purified_pixel_values
from .evaluation import (
    CSV_FIELDS,
    THREAT_MODELS,
    EvalImages,
    EvalSettings,
    evaluate,
    load_eval_images,
    render_markdown,
    write_reports,
)

__all__ = [
    "ADAPTIVE_ATTACKS",
    "CSV_FIELDS",
    "THREAT_MODELS",
    "EvalImages",
    "EvalSettings",
    "PurifiedClassifier",
    "amplified_perturbation",
    "evaluate",
    "is_stochastic",
    "load_eval_images",
    "make_adaptive_attack",
    "purified_pixel_values",
    "render_markdown",
    "write_reports",
]
