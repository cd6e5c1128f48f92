"""Loading a purifier: ``load_purifier`` from a preset name, a saved folder, a Hub id or the embedded default.

Sits next to the Hub files and imports only them (DESIGN.md section 7), so every pipeline
module can load a purifier without reaching into publishing (cards, Hub folders, the Space).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .configuration_impure import PRESETS
from .modeling_impure import ImpureModel

# The embedded default purifier shipped inside the package (see model_card/ and the README).
DEFAULT_MODEL = str(Path(__file__).parent / "weights" / "impure-vit-tiny-demo")
# Default Hub repo ids of the presets' published weights; every function takes a repo id instead.
HUB_REPO_IDS: dict[str, str] = {
    "impure-vit-b": "impure-hf/impure-vit-b",
    "impure-vit-b-release": "impure-hf/impure-vit-b-release",
    "impure-vit-tiny": "impure-hf/impure-vit-tiny",
}


def load_purifier(
    name_or_path: Optional[str] = None,
    device: Union[str, torch.device, None] = None,
    allow_missing_weights: bool = False,
    **kwargs,
) -> ImpureModel:
    """A purifier in eval mode from a preset name (untrained), a saved folder or a Hub id.

    ``None`` loads the embedded default model shipped in the package (``DEFAULT_MODEL``).
    Weights missing from the checkpoint, or present there but unknown to the model, raise a
    ``ValueError`` naming them: a purifier with randomly initialised blocks runs but outputs garbage.
    ``allow_missing_weights=True`` loads such a checkpoint anyway (as transformers'
    ``ignore_mismatched_sizes`` does for shapes).
    Extra keyword arguments go to ``from_preset`` / ``from_pretrained`` (e.g. ``cache_dir``,
    ``local_files_only``, ``revision`` or config overrides such as ``decoder_chunk_size``).
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
        if not (Path(name_or_path) / "config.json").exists():
            raise FileNotFoundError(
                f"the embedded default model is missing from this installation ({name_or_path}); "
                "pass a preset name, a folder or a Hub id with --model"
            )
    if name_or_path in PRESETS:
        model = ImpureModel.from_preset(name_or_path, **kwargs)
    else:
        path = Path(name_or_path)
        if path.exists() and not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not a saved IMPure model folder")
        if not path.exists() and str(name_or_path).count("/") != 1:  # a Hub id is OWNER/NAME
            raise ValueError(
                f"unknown model {name_or_path!r}: not a preset ({', '.join(PRESETS)}), "
                "an existing folder or a Hub id (OWNER/NAME)"
            )
        model, info = ImpureModel.from_pretrained(str(name_or_path), output_loading_info=True, **kwargs)
        problems = [
            f"{kind} {', '.join(sorted(info[key]))}"
            for key, kind in (("missing_keys", "missing from the checkpoint:"), ("unexpected_keys", "unknown to the model:"))
            if info[key]
        ]
        if problems and not allow_missing_weights:
            raise ValueError(
                f"{name_or_path} does not match the model's weights ({'; '.join(problems)}); "
                "missing weights would be randomly initialised. Pass allow_missing_weights=True to load it anyway"
            )
    return model.to(device).eval() if device is not None else model.eval()


__all__ = ["DEFAULT_MODEL", "HUB_REPO_IDS", "load_purifier"]
