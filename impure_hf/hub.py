"""Loading purifiers by name, folder or Hub id; publishing Hub folders (see also hubconf.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .configuration_impure import PRESETS
from .modeling_impure import ImpureModel


def load_purifier(
    name_or_path: Optional[str] = None,
    device: Union[str, torch.device, None] = None,
    **kwargs,
) -> ImpureModel:
    """A purifier in eval mode from a preset name (untrained), a saved folder or a Hub id.

    ``None`` loads the embedded default model shipped in the package (``impure_hf.DEFAULT_MODEL``).
    """
    from . import DEFAULT_MODEL

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
        model = ImpureModel.from_pretrained(str(name_or_path), **kwargs)
    return model.to(device).eval() if device is not None else model.eval()


__all__ = ["load_purifier"]
