"""Small helpers shared across the package (file listing, process state, parsing, atomic writes).

Imports nothing else of the package (DESIGN.md section 7), so any module may use it.
"""

# ------------------------------------------------------------------ atomic writes, named read errors
# (reliability, issue #20) Every cache, state and output file is written under a temporary name in
# its own folder and renamed into place with os.replace, so a killed process leaves either the old
# file or the new one, never half of one; a file that is still corrupt is named in the error.
import contextlib as _contextlib
import json as _json
import os as _os
import tempfile as _tempfile
from pathlib import Path as _Path
from typing import Any as _Any, Callable as _Callable, Iterator as _Iterator, Union as _Union

PathLike = _Union[str, "_os.PathLike[str]"]
_UMASK = _os.umask(0o022)  # read once (os.umask can only be read by setting it); restored at once
_os.umask(_UMASK)


class CorruptFileError(ValueError):
    """A cache, state or weights file that exists but cannot be read; its path is in the message."""

    def __init__(self, path: PathLike, reason: object, hint: str = "delete it and rerun"):
        self.path = _Path(path)
        super().__init__(f"{self.path} is corrupt or truncated ({reason}); {hint}")


@_contextlib.contextmanager
def atomic_path(path: PathLike) -> _Iterator[_Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    The temporary name is hidden (leading dot) and keeps the suffix, so writers that look at the
    extension (PIL, safetensors) still work and folder listings skip it. On an exception the
    temporary file is removed and ``path`` is left as it was.
    """
    path = _Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the stem is shortened so that a name near the file system's limit still has room for the rest
    fd, name = _tempfile.mkstemp(prefix=f".{path.stem[:64]}.", suffix=f".tmp{path.suffix[:16]}", dir=path.parent)
    _os.close(fd)
    temporary = _Path(name)
    _os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield temporary
        _os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            _os.fsync(f.fileno())


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: _Any, **dumps_kwargs) -> None:
    atomic_write_text(path, _json.dumps(obj, **dumps_kwargs))


def atomic_save_safetensors(tensors: dict, path: PathLike, metadata: "dict | None" = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def atomic_save_with(path: PathLike, writer: _Callable[[_Path], None]) -> None:
    """``writer(temporary_path)`` writes the file (e.g. ``image.save``), then it is renamed into place."""
    with atomic_path(path) as temporary:
        writer(temporary)


def read_json(path: PathLike, hint: str = "delete it and rerun") -> _Any:
    """``json.loads`` of a file; a truncated or invalid file raises `CorruptFileError` naming it."""
    path = _Path(path)
    try:
        return _json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CorruptFileError(path, err, hint) from err


def load_safetensors(path: PathLike, device: str = "cpu", hint: str = "delete it and rerun") -> dict:
    """``safetensors.torch.load_file``; a truncated or invalid file raises `CorruptFileError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CorruptFileError(path, err, hint) from err
# ------------------------------------------------------------------ end of atomic writes
