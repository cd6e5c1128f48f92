"""The settings of an evaluation, in one dataclass: ``evaluate()`` takes them, the cache key and the
report are built from them, and ``impure evaluate``'s flags are generated from them
(``transformers.HfArgumentParser``), so each setting and its help text is written once."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..attacks import ADAPTIVE_ATTACKS, ATTACKS, check_eps
from ..baselines import DEFAULT_BASELINES
from ..precision import DTYPES, check_dtype

THREAT_MODELS: dict[str, str] = {
    "black-box": "black-box: attack crafted on the classifier alone, then purified",
    "white-box": "white-box adaptive: attack crafted end to end on purifier + classifier "
    "(exact gradients, BPDA for non-differentiable defences, EOT over randomness)",
}
CLEAN = "clean"
NO_DEFENCE = "none"


def _option(default: Any = None, help: str = "", **metadata) -> Any:
    """A settings field; its help text is the flag's. Lists get a fresh copy per instance."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def no_baseline_if_none(baselines) -> list:
    """``["none"]`` (the flag's way to ask for no baseline) -> ``[]``; other lists unchanged."""
    baselines = list(baselines)
    if any(isinstance(b, str) and b == "none" for b in baselines):
        if len(baselines) > 1:
            raise ValueError(f"baselines 'none' cannot be combined with others, got {baselines}")
        return []
    return baselines


@dataclass
class EvalSettings:
    """What ``evaluate`` measures and how. Every field is also a flag of ``impure evaluate``.

    ``purifier``, ``classifiers``, ``baselines`` and ``data`` are names here; ``evaluate`` also
    takes ready modules / ``EvalImages`` for them as its own arguments.
    """

    purifier: Optional[str] = _option(None, "IMPure purifier: preset name, saved folder or Hub id "
                                            "(function: None = baselines only; command: the embedded model)")
    classifiers: list[str] = _option(["efficientnet_lite0"], "target classifier names (impure_hf.classifiers.load_classifier)")
    attacks: Optional[list[str]] = _option(None, "black-box attacks (default: the nine of the paper)")
    adaptive_attacks: list[str] = _option(ADAPTIVE_ATTACKS, "white-box attacks: pgd-eot, autoattack-rand or any of the nine")
    threat_models: list[str] = _option(["black-box", "white-box"], "threat models", choices=list(THREAT_MODELS))
    baselines: list[str] = _option(DEFAULT_BASELINES, "baseline specs, e.g. jpeg:quality=50 harmonic:patch_size=8 "
                                                      "(impure_hf.baselines.build_baseline); 'none' for none")
    data: Optional[str] = _option(None, "image folder or saved adversarial dataset (default: foolbox's 20 ImageNet photos)")
    split: str = _option("test", "dataset split")
    max_images: Optional[int] = _option(None, "use only the first images of the data")
    image_size: Optional[int] = _option(None, "evaluation resolution (default: the purifier's image_size, else 224)")
    eps: float = _option(16 / 255, "L_inf budget in [0, 1] pixel units, e.g. 16/255 or 0.03 (the L2 attacks are minimal)")
    steps: Optional[int] = _option(None, "override the attacks' number of steps (one-step attacks keep one)")
    eot_samples: int = _option(8, "EOT samples of white-box attacks on stochastic defences")
    num_samples: int = _option(1, "purifications averaged (logits) per prediction")
    repeats: int = _option(3, "evaluations of each stochastic defence with fresh randomness (mean ± std)")
    round_adversarial: bool = _option(True, "round adversarial images to 8 bits before the defence (as stored)")
    correct_only: bool = _option(True, "evaluate only images each classifier gets right (the paper)")
    batch_size: int = _option(8, "images per batch; also the unit of sharding and of seeding")
    seed: int = _option(0, "root of every random seed (attacks, purifiers, untrained preset weights)")
    out_dir: Optional[str] = _option(None, "output folder: reports and the resumable cache (None: neither)",
                                     aliases=["--out"])
    panels: int = _option(3, "images per side-by-side panel (0: none)")
    device: Optional[str] = _option(None, "compute device (default: the process's accelerate device, else CPU)")
    dtype: str = _option("fp32", "purifier precision: fp32, bf16 (autocast) or auto (bf16 only where measured faster "
                                 "here); fp32 by default, so reported numbers do not depend on the machine", choices=list(DTYPES))
    progress: bool = _option(True, "show progress bars on the main process")

    def checked(self) -> "EvalSettings":
        """These settings with eps as a float; fails before any loading on names or numbers that cannot work."""
        attacks = list(ATTACKS) if self.attacks is None else list(self.attacks)
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"unknown attack(s) {unknown}; choose from {list(ATTACKS)}")
        unknown = [a for a in self.adaptive_attacks if a not in ATTACKS and a not in ADAPTIVE_ATTACKS]
        if unknown:
            raise ValueError(f"unknown white-box attack(s) {unknown}; choose from {list(ADAPTIVE_ATTACKS) + list(ATTACKS)}")
        unknown = [t for t in self.threat_models if t not in THREAT_MODELS]
        if unknown:
            raise ValueError(f"unknown threat model(s) {unknown}; choose from {list(THREAT_MODELS)}")
        counts = {"eot_samples": self.eot_samples, "num_samples": self.num_samples, "repeats": self.repeats,
                  "batch_size": self.batch_size, **({"steps": self.steps} if self.steps is not None else {})}
        for name, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_dtype(self.dtype)
        if not isinstance(self.panels, int) or isinstance(self.panels, bool) or self.panels < 0:
            raise ValueError(f"panels must be a non-negative integer (0: no panels), got {self.panels!r}")
        baselines = no_baseline_if_none(self.baselines)
        return dataclasses.replace(
            self, attacks=attacks, adaptive_attacks=list(self.adaptive_attacks), threat_models=list(self.threat_models),
            baselines=baselines, eps=check_eps(self.eps),
            # text, so that the report's config is JSON (a Path or torch.device may come in)
            out_dir=None if self.out_dir is None else str(self.out_dir),
            device=None if self.device is None else str(self.device),
        )

    def cell_key(self, white_box: bool, stochastic: bool) -> dict:
        """The settings a table cell depends on (its cache key, beside the models and images)."""
        return {
            "eps": self.eps,
            "steps": self.steps,
            "eot_samples": self.eot_samples if white_box else None,
            "num_samples": self.num_samples,
            "repeats": self.repeats if stochastic else 1,
            "rounded": self.round_adversarial,
            "seed": self.seed,
            "batch_size": self.batch_size,
            # only when not fp32, so caches written before the setting existed stay valid
            **({"dtype": self.dtype} if self.dtype != "fp32" else {}),
        }

    def adversarial_key(self) -> list:
        """The settings a black-box adversarial batch depends on (its cache key)."""
        return [self.eps, self.steps, self.seed, self.round_adversarial]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _seed(*parts) -> int:
    """A stable 31-bit seed from any labels (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") & 0x7FFFFFFF


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


__all__ = ["CLEAN", "NO_DEFENCE", "THREAT_MODELS", "EvalSettings"]
