"""Small helpers shared across the package (file listing, process state, parsing, atomic writes).

Imports nothing else of the package (DESIGN.md section 7), so any module may use it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# ---------------------------------------------------------------------------------- files, processes, parsing
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def iter_image_files(paths: Iterable) -> list[Path]:
    """Image files from files and folders (folders searched recursively, sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no image files in folder {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such image file or folder: {path}")
    return files


def process_state() -> PartialState:
    """accelerate's process state; on CPUs (gloo) accelerate forms the process group only when told so."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def parse_eps(text: str) -> float:
    """``"16/255"`` or ``"0.0627"`` -> float (argparse type)."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"eps must be a number or a fraction like 16/255, got {text!r}") from None


# ------------------------------------------------------------------ atomic writes, named read errors
# (reliability, issue #20) Every cache, state and output file is written under a temporary name in
# its own folder and renamed into place with os.replace, so a killed process leaves either the old
# file or the new one, never half of one; a file that is still corrupt is named in the error.

PathLike = Union[str, "os.PathLike[str]"]
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it); restored at once
os.umask(_UMASK)


class CorruptFileError(ValueError):
    """A cache, state or weights file that exists but cannot be read; its path is in the message."""

    def __init__(self, path: PathLike, reason: object, hint: str = "delete it and rerun"):
        self.path = Path(path)
        super().__init__(f"{self.path} is corrupt or truncated ({reason}); {hint}")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    The temporary name is hidden (leading dot) and keeps the suffix, so writers that look at the
    extension (PIL, safetensors) still work and folder listings skip it. On an exception the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the stem is shortened so that a name near the file system's limit still has room for the rest
    fd, name = tempfile.mkstemp(prefix=f".{path.stem[:64]}.", suffix=f".tmp{path.suffix[:16]}", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, **dumps_kwargs) -> None:
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs))


def atomic_save_safetensors(tensors: dict, path: PathLike, metadata: "dict | None" = None) -> None:
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def atomic_save_with(path: PathLike, writer: Callable[[Path], None]) -> None:
    """``writer(temporary_path)`` writes the file (e.g. ``image.save``), then it is renamed into place."""
    with atomic_path(path) as temporary:
        writer(temporary)


def read_json(path: PathLike, hint: str = "delete it and rerun") -> Any:
    """``json.loads`` of a file; a truncated or invalid file raises `CorruptFileError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CorruptFileError(path, err, hint) from err


def load_safetensors(path: PathLike, device: str = "cpu", hint: str = "delete it and rerun") -> dict:
    """``safetensors.torch.load_file``; a truncated or invalid file raises `CorruptFileError` naming it."""
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CorruptFileError(path, err, hint) from err
# ------------------------------------------------------------------ end of atomic writes
