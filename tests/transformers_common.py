"""transformers' own common model tests (``ModelTesterMixin``, ``ConfigTester``) for our suite.

The installed transformers wheel does not ship its ``tests/`` folder. Its source distribution holds
``tests/test_*_common.py`` but not ``tests/utils``, ``tests/generation`` and ``tests/exporters``,
from which those files import one name each. ``load()`` fetches the sdist of exactly the installed
version once with pip (the package registry CI also uses), extracts the common files into a cache as
the package ``transformers_common_tests`` and writes stand-ins for the three missing names (STUBS).
The cache is ``$IMPURE_TRANSFORMERS_TESTS_CACHE`` or ``~/.cache/impure_hf/transformers-tests``,
one folder per version, written atomically (extracted beside it, then renamed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"
COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py")

# Stand-ins for the three names the common files import from test folders the sdist leaves out.
STUBS = {
    # ExportTesterMixin only adds transformers' torch.export tests; tests/test_conformance.py
    # exports and compiles ImpureModel itself (with the image as the only input).
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    # ImpureModel cannot generate; the mixin only serves generative models.
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    # ConfigTester.check_config_arguments_init sets each of these to a non-default value and checks
    # that the config keeps it; these are every public attribute of PreTrainedConfig in 5.x.
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        "    'return_dict': False,\n"
        "    'output_hidden_states': True,\n"
        "    'output_attentions': True,\n"
        "    'dtype': 'float16',\n"
        "    'chunk_size_feed_forward': 5,\n"
        "    'architectures': ['BertModel'],\n"
        "    'id2label': {0: 'label'},\n"
        "    'label2id': {'label': '0'},\n"
        "    'problem_type': 'regression',\n"
        "}\n"
    ),
}


def cache_root() -> Path:
    default = Path.home() / ".cache" / "impure_hf" / "transformers-tests"
    return Path(os.environ.get("IMPURE_TRANSFORMERS_TESTS_CACHE", default))


def _fetch(version: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"transformers=={version}", "-d", str(tmp / "dl"), "--quiet"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        archives = list((tmp / "dl").glob("transformers-*.tar.gz")) if result.returncode == 0 else []
        if not archives:
            raise RuntimeError(f"pip could not download the transformers {version} sdist: {result.stderr.strip()[-500:]}")
        package = tmp / PACKAGE
        package.mkdir()
        with tarfile.open(archives[0]) as tar:
            for name in COMMON_FILES:
                member = tar.getmember(f"transformers-{version}/tests/{name}")
                (package / name).write_bytes(tar.extractfile(member).read())
        for relative, text in {"__init__.py": "", **STUBS}.items():
            path = package / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(text)
        try:
            os.replace(tmp / PACKAGE, target)  # atomic: a half-written cache is never seen
        except OSError:
            if not (target / "__init__.py").exists():  # another process won the race: keep its copy
                raise


def load() -> Path:
    """Make ``transformers_common_tests`` importable; returns its folder. Raises RuntimeError
    (with the reason) when the sdist cannot be had."""
    version = transformers.__version__
    folder = cache_root() / version
    target = folder / PACKAGE
    if not (target / "__init__.py").exists():
        _fetch(version, target)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return target


__all__ = ["load", "cache_root", "STUBS"]
