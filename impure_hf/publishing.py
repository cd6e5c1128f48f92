"""Publishing: Hub folders with remote code, model cards, the HF cache, and the demo page as a Space.

- ``save_hub_folder`` / ``check_hub_folder`` / ``upload_hub_folder`` / ``publish``: the complete
  folder a Hub repo needs (config.json with ``auto_map``, model.safetensors,
  preprocessor_config.json, the four remote-code files, README.md) and its upload.
- ``build_model_card`` / ``validate_model_card`` / ``load_eval_results``: the model card from the
  package's template (``impure_hf/templates/model_card.md``) with ``model-index`` results from the
  [eval] JSON, checked offline.
- ``add_to_hf_cache``: place a Hub folder into the HF cache exactly as a download leaves it, so that
  ``from_pretrained(repo_id)`` works offline (air-gapped machines, tests).
- ``write_space`` / ``publish_space``: a Hugging Face Space folder (Gradio SDK) serving ``impure app``.

Command line (wired in cli.py): ``impure publish [--space]``, ``impure card``. Loading lives in
loading.py; see also hubconf.py (torch.hub entry points).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, SpaceCard, SpaceCardData, constants
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from huggingface_hub.utils.sha import git_hash, sha_fileobj
from safetensors import safe_open

from ._utils import atomic_write_text
from ._version import __version__
from .image_processing_impure import ImpureImageProcessor
from .loading import DEFAULT_MODEL, HUB_REPO_IDS, load_purifier
from .modeling_impure import ImpureModel

PathLike = Union[str, Path]
# The GitHub repository that holds hubconf.py (torch.hub.load's "OWNER/NAME").
GITHUB_REPO = "impure-hf/impure_hf"
# Files copied into a Hub folder as remote code: they may import only each other and third parties.
REMOTE_CODE_FILES = (
    "configuration_impure.py", "layers_impure.py", "modeling_impure.py", "image_processing_impure.py",
)
HUB_FOLDER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", *REMOTE_CODE_FILES)
# The card template is package data, so `impure card` works from an installed wheel too.
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib"}
_LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above 10 MB in LFS
# Installed without their dependencies, as install.sh does: torchattacks pins requests~=2.25.1 (never
# used), which pip cannot resolve together with the Hugging Face stack, so a requirements file cannot list it.
NO_DEPS_REQUIREMENTS = ("torchattacks==3.5.1", "foolbox==3.3.4")


# ---------------------------------------------------------------------------------- eval results
_ALIASES = {
    "defense": ("defence", "defense", "purifier"),
    "classifier": ("classifier", "target"),
    "attack": ("attack",),
    "threat_model": ("threat_model",),
    "norm": ("norm",),
    "steps": ("steps",),
    "num_images": ("num_images",),
    "eot_samples": ("eot_samples",),
    "dataset": ("dataset",),
}
CLEAN_ROW = "none (clean images)"  # the threat-model label of clean accuracy, as `impure evaluate` writes it


def load_eval_results(path: Union[str, Path]) -> list[dict[str, Any]]:
    """Rows of an evaluation results JSON, normalised for the model card.

    Reads the ``results.json`` of ``impure evaluate`` (``{"cells": [...], "config": {...}}``: per cell
    ``classifier``, ``threat_model`` (null for clean images), ``attack``, ``defence``, ``norm``,
    ``eps`` / ``eps_255``, ``steps``, ``eot_samples``, ``num_images``, ``accuracy_mean`` and
    ``accuracy_std`` in percent, ``repeats``; ``config.data`` names the images), or a plain list of
    rows (or ``{"results": [...]}``) with the same keys, where ``accuracy`` may be given as a fraction
    in [0, 1] instead of ``accuracy_mean``. Every attacked row must name its threat model.
    Returns rows with the keys of ``_ALIASES`` plus ``eps`` (text), ``accuracy`` and ``std`` in percent.
    """
    data = json.loads(Path(path).read_text())
    config = data.get("config", {}) if isinstance(data, dict) else {}
    rows = (data.get("cells") or data.get("results")) if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected evaluation cells (impure evaluate's results.json) or a list of rows")
    normalised = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: result row {i} is not an object: {row!r}")
        out = {key: next((row[a] for a in aliases if row.get(a) is not None), None) for key, aliases in _ALIASES.items()}
        if out["attack"] is None:
            raise ValueError(f"{path}: result row {i} has no 'attack'")
        if out["threat_model"] is None:
            if out["attack"] != "clean":
                raise ValueError(f"{path}: result row {i} ({out['attack']}) has no 'threat_model'; every number must name it")
            out["threat_model"] = CLEAN_ROW
        if row.get("accuracy_mean") is not None:
            out["accuracy"], scale = float(row["accuracy_mean"]), 1.0
        elif row.get("accuracy") is not None:
            if not 0.0 <= float(row["accuracy"]) <= 1.0:
                raise ValueError(f"{path}: row {i}: 'accuracy' is a fraction in [0, 1]; use 'accuracy_mean' for percent")
            out["accuracy"], scale = 100.0 * float(row["accuracy"]), 100.0
        else:
            raise ValueError(f"{path}: result row {i} has no 'accuracy_mean' (percent) or 'accuracy' (fraction)")
        spread = row.get("accuracy_std", row.get("std"))
        out["std"] = float(spread) * scale if spread is not None and row.get("repeats", 2) > 1 else None
        if row.get("eps_255") is not None:
            out["eps"] = f"{row['eps_255']:g}/255"
        else:
            out["eps"] = row.get("eps")
        if out["threat_model"] != "white-box":  # EOT applies to attacks through the purifier only
            out["eot_samples"] = None
        out["dataset"] = out["dataset"] or config.get("data")
        normalised.append(out)
    return normalised


def _is_this_model(row: dict) -> bool:
    return row["defense"] is None or "impure" in str(row["defense"]).lower()


def _results_tables(rows: list[dict]) -> str:
    """One markdown table per threat model."""
    tables = []
    for threat in dict.fromkeys(r["threat_model"] for r in rows):
        lines = [f"**{threat}**", "", "| classifier | attack | norm | eps | steps | EOT | images | defence | top-1 (%) |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["threat_model"] == threat):
            acc = f"{r['accuracy']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else "")
            cells = [r["classifier"], r["attack"], r["norm"], r["eps"], r["steps"], r["eot_samples"], r["num_images"],
                     r["defense"] or "IMPure", acc]
            lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _eval_results(rows: list[dict]):
    """model-index entries (``EvalResult``) for the rows of this model."""
    results = []
    for r in filter(_is_this_model, rows):
        dataset = str(r["dataset"] or "unspecified images")
        details = {k: r[k] for k in ("threat_model", "attack", "classifier", "norm", "eps", "steps", "num_images", "eot_samples")
                   if r[k] is not None}
        results.append(EvalResult(
            task_type="image-classification",
            task_name="Image classification behind the purifier",
            dataset_type=re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-"),
            dataset_name=dataset,
            metric_type="accuracy",
            metric_value=round(r["accuracy"], 2),
            metric_name=f"top-1 accuracy (%), {r['threat_model']}, {r['attack']}" + (f", {r['classifier']}" if r["classifier"] else ""),
            metric_args=details,
        ))
    return results or None


# ---------------------------------------------------------------------------------- model card
_DEFAULT_TRAINING = (
    "The paper trains on adversarial examples of ImageNet-1k train images (10 per class) crafted against "
    "the target classifiers (Inception-v3, Inception-ResNet-v2, ResNet-101) with PGD, DI-FGSM, CW-L2 and "
    "DeepFool (L_inf eps 16/255, step 4/255, 10 steps), with an L1 pixel loss plus VGG19 perceptual terms "
    "computed after random content mixing (RCM). The training data of *these* weights is not recorded in "
    "this card; see the provenance above."
)


def _hub_entry(repo_id: str) -> tuple[str, str]:
    """(torch.hub entry point, extra kwargs text) that loads ``repo_id``."""
    for preset, default_id in HUB_REPO_IDS.items():
        # impure_vit_tiny's default is the embedded copy, so its Hub repo is named explicitly
        if default_id == repo_id and preset != "impure-vit-tiny":
            return preset.replace("-", "_"), ""
    entry = "impure_vit_tiny" if repo_id == HUB_REPO_IDS["impure-vit-tiny"] else "impure_vit_b"
    return entry, f', repo_id="{repo_id}"'


def build_model_card(
    model: ImpureModel,
    repo_id: str,
    *,
    eval_results: Union[str, Path, list[dict], None] = None,
    provenance: Optional[str] = None,
    training_notes: Optional[str] = None,
    model_name: Optional[str] = None,
    license: str = "apache-2.0",
    license_name: Optional[str] = None,
    license_link: Optional[str] = None,
    github_repo: str = GITHUB_REPO,
    template: Union[str, Path, None] = None,
):
    """The Hub model card (``huggingface_hub.ModelCard``) of ``model``, from the package template (``MODEL_CARD_TEMPLATE``).

    Args:
        repo_id: the Hub repo id shown in the loading examples.
        eval_results: an [eval] results JSON path or rows from ``load_eval_results``; rows of this
            model (defence "IMPure" or unnamed) become ``model-index`` entries, all rows go into
            markdown tables, one per threat model.
        provenance: markdown paragraph saying where the weights come from (conversion, training run).
        training_notes: markdown describing the training data and attacks of these weights.
        license / license_name / license_link: card licence metadata (``other`` needs a name).
    """
    template = Path(template) if template is not None else MODEL_CARD_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"model card template not found: {template} (pass template= / --template)")
    rows = load_eval_results(eval_results) if isinstance(eval_results, (str, Path)) else (eval_results or [])
    c = model.config
    model_name = model_name or repo_id.split("/")[-1]
    index = _eval_results(rows) if rows else None
    card_data = ModelCardData(
        model_name=model_name if index else None,  # names the model-index entry
        license=license,
        license_name=license_name,
        license_link=license_link,
        library_name="transformers",
        pipeline_tag="image-to-image",
        tags=["adversarial-purification", "adversarial-robustness", "impure", "masked-autoencoder", "vision", "custom_code"],
        metrics=["accuracy"] if rows else None,
        eval_results=index,
    )
    masking = {"noise": "ImgNoise: features of a diffused copy of the image", "occlude": "a learned mask token",
               "none": "no image masking"}[c.image_mask]
    if c.feature_mask == "noise":
        masking += ", plus FeaNoise on the stand-in features"
    params = sum(p.numel() for p in model.parameters())
    config_rows = [
        ("parameters", f"{params / 1e6:.2f} M"),
        ("input size / patch", f"{c.image_size} / {c.patch_size}"),
        ("encoder", f"width {c.hidden_size}, depth {c.num_hidden_layers}, heads {c.num_attention_heads}, MLP {c.intermediate_size}"),
        ("decoder", f"width {c.decoder_hidden_size}, depth {c.decoder_num_hidden_layers}, heads {c.decoder_num_attention_heads}, MLP {c.decoder_intermediate_size}"),
        ("subsets S", c.num_subsets),
        ("image mask / feature mask", f"{c.image_mask} / {c.feature_mask}"),
        ("noise steps (eval)", f"image t={c.image_noise_eval_step}, features t={c.feature_noise_eval_step}" if c.uses_noise else "-"),
        ("fusion layers", ", ".join(map(str, c.fusion_layers)) or "none"),
        ("position grid", f"{c.pos_grid} x {c.pos_grid}"),
        ("head token / 3x3 refinement", f"{c.use_head_token} / {c.use_conv_refine}"),
    ]
    k = math.isqrt(c.num_subsets)
    division_notes = {
        "uniform": f"Patch (r, c) belongs to subset (r mod {k}) * {k} + (c mod {k}): each subset is a stride-{k} "
                   "lattice, in ascending order inside each subset, so the division is deterministic. This is the "
                   "division of the authors' evaluation script (data_process/main_advpur.py); their demo.py used "
                   "a random one.",
        "random": "A fresh random division is drawn on every call (from the generator).",
    }
    stochastic = ("The output is stochastic: fresh Gaussian image and feature noise are drawn on every call, "
                  "also in eval mode (as in the paper and the release)." if c.uses_noise else
                  "With these masking settings and the uniform division the output is deterministic.")
    entry, entry_kwargs = _hub_entry(repo_id)
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        repo_id=repo_id,
        github_repo=github_repo,
        hub_entry=entry,
        hub_entry_kwargs=entry_kwargs,
        num_subsets=c.num_subsets,
        masking=masking,
        provenance=provenance or "Weights saved with impure_hf.",
        config_rows=config_rows,
        eval_division=c.eval_division,
        eval_division_note=division_notes[c.eval_division],
        image_size=c.image_size,
        patch_size=c.patch_size,
        uniform_root=k,
        training=training_notes or _DEFAULT_TRAINING,
        results_tables=_results_tables(rows) if rows else "",
        has_adaptive=any(str(r["threat_model"]).startswith("white-box") for r in rows),
        stochastic_note=stochastic,
    )
    return card


def validate_model_card(card_or_path) -> Any:
    """Offline model-card check (a card file path, a ``ModelCard`` or the card's text): what ``ModelCard.validate`` (a Hub API call) checks in the metadata.

    Parses the YAML header strictly (``ignore_metadata_errors=False``), requires the licence, library,
    pipeline tag and tags, requires ``license_name`` for ``license: other``, and parses ``model-index``
    back into ``EvalResult`` objects (``model_index_to_eval_results``), requiring a numeric value for
    every metric and an exact round trip. Returns the parsed ``ModelCard``.
    """
    is_path = isinstance(card_or_path, Path) or (isinstance(card_or_path, str) and "\n" not in card_or_path)
    text = Path(card_or_path).read_text(encoding="utf-8") if is_path else str(card_or_path)
    if not text.startswith("---"):
        raise ValueError("model card has no YAML metadata block")
    card = ModelCard(text, ignore_metadata_errors=False)
    metadata = yaml.safe_load(text.split("---", 2)[1])
    for key in ("license", "library_name", "pipeline_tag", "tags"):
        if not metadata.get(key):
            raise ValueError(f"model card metadata lacks '{key}'")
    if metadata["license"] == "other" and not metadata.get("license_name"):
        raise ValueError("model card metadata: 'license: other' needs a 'license_name'")
    if not isinstance(metadata["tags"], list) or not all(isinstance(t, str) for t in metadata["tags"]):
        raise ValueError("model card metadata: 'tags' must be a list of strings")
    if "model-index" in metadata:
        name, results = model_index_to_eval_results(metadata["model-index"])
        for result in results:
            if not isinstance(result.metric_value, (int, float)) or isinstance(result.metric_value, bool):
                raise ValueError(f"model-index metric {result.metric_name!r} has a non-numeric value {result.metric_value!r}")
        if eval_results_to_model_index(name, results) != metadata["model-index"]:
            raise ValueError("model-index does not round-trip through huggingface_hub's EvalResult parser")
    return card


# ---------------------------------------------------------------------------------- Hub folder
def _check_remote_code(folder: Path) -> None:
    """The remote-code files exist and import only each other (relatively) and third-party packages."""
    local = {Path(name).stem for name in REMOTE_CODE_FILES}
    for name in REMOTE_CODE_FILES:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"remote-code file {name} is missing from {folder}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.level > 1 or (node.module or "") not in local:
                    raise ValueError(f"{name} imports .{node.module}: remote code may import only {sorted(local)}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for module in modules:
                    if module.split(".")[0] == __package__.split(".")[0]:
                        raise ValueError(f"{name} imports {module}: remote code must not need the impure_hf package")


def check_hub_folder(folder: Union[str, Path]) -> None:
    """A Hub folder is complete and safe: required files, ``auto_map``, remote-code imports, a valid
    model card, and no pickle anywhere (every file is UTF-8 text or a readable safetensors file)."""
    folder = Path(folder)
    missing = [name for name in HUB_FOLDER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"Hub folder {folder} lacks {missing}")
    auto_map = json.loads((folder / "config.json").read_text()).get("auto_map", {})
    for auto_class in ("AutoConfig", "AutoModel"):
        if auto_class not in auto_map:
            raise ValueError(f"{folder}/config.json: auto_map has no {auto_class}")
    _check_remote_code(folder)
    validate_model_card(folder / "README.md")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix in _PICKLE_SUFFIXES:
            raise ValueError(f"{path} is a pickle-based file; a Hub folder holds safetensors weights only")
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt"):
                pass
            continue
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path} is neither text nor safetensors (a pickle?); remove it from the Hub folder") from None


def save_hub_folder(
    model: ImpureModel,
    out_dir: Union[str, Path],
    repo_id: str,
    processor=None,
    card=None,
    **card_kwargs,
) -> Path:
    """Write the complete Hub folder of ``model`` and check it (``check_hub_folder``).

    ``save_pretrained`` writes config.json (``auto_map``: AutoConfig, AutoModel), model.safetensors
    and the remote-code files; this adds the image processor (default: centre crop to the model's
    ``image_size``) with its ``auto_map``, ``AutoImageProcessor`` to config.json's ``auto_map`` and
    README.md: ``card`` (a ``ModelCard`` or text) or one built by ``build_model_card(**card_kwargs)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor = processor or ImpureImageProcessor(crop_size=model.config.image_size)
    processor.save_pretrained(out)
    # remote code also for AutoImageProcessor.from_pretrained(repo) resolved through config.json
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("auto_map", {})["AutoImageProcessor"] = "image_processing_impure.ImpureImageProcessor"
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in REMOTE_CODE_FILES:  # save_pretrained copies them; make sure of it on every version
        if not (out / name).exists():
            shutil.copy(Path(__file__).parent / name, out / name)
    card = card if card is not None else build_model_card(model, repo_id, **card_kwargs)
    atomic_write_text(out / "README.md", str(card))
    check_hub_folder(out)
    return out


def upload_hub_folder(
    folder: Union[str, Path],
    repo_id: str,
    private: bool = False,
    commit_message: str = "Upload IMPure purifier",
    token: Optional[str] = None,
) -> str:
    """Create the Hub repo if needed and upload the checked folder; returns the commit URL."""
    check_hub_folder(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message).commit_url


def publish(
    model_dir: Union[str, Path, None],
    repo_id: Optional[str] = None,
    out_dir: Union[str, Path, None] = None,
    dry_run: bool = False,
    card: Union[str, Path, None] = None,
    private: bool = False,
    token: Optional[str] = None,
    **card_kwargs,
) -> Path:
    """Build the Hub folder of a saved model and upload it (unless ``dry_run``).

    Args:
        model_dir: a saved model folder; ``None`` = the embedded default (repo id defaults to
            ``HUB_REPO_IDS["impure-vit-tiny"]``).
        repo_id: target Hub repo ``ORG/NAME``.
        out_dir: where to build the folder (default: ``<model_dir>-hub`` beside it).
        card: an existing model card file to use; default: ``<model_dir>/README.md`` if present and
            no ``card_kwargs`` are given, else a new card from ``build_model_card(**card_kwargs)``.
    """
    if model_dir is None:
        model_dir, repo_id = DEFAULT_MODEL, repo_id or HUB_REPO_IDS["impure-vit-tiny"]
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved model folder (no config.json)")
    if not repo_id or repo_id.count("/") != 1:
        raise ValueError(f"--repo-id must be ORG/NAME, got {repo_id!r}")
    model = load_purifier(str(model_dir))
    if card is None and not card_kwargs and (model_dir / "README.md").is_file():
        card = model_dir / "README.md"
    card = validate_model_card(card) if card is not None else None
    processor = None
    if (model_dir / "preprocessor_config.json").is_file():
        processor = ImpureImageProcessor.from_pretrained(str(model_dir))
    out = Path(out_dir) if out_dir is not None else model_dir.parent / f"{model_dir.name}-hub"
    if out.resolve() == model_dir.resolve():
        raise ValueError("--out must differ from MODEL_DIR")
    save_hub_folder(model, out, repo_id, processor=processor, card=card, **card_kwargs)
    if not dry_run:
        print(upload_hub_folder(out, repo_id, private=private, token=token))
    return out


# ---------------------------------------------------------------------------------- HF cache
def add_to_hf_cache(
    folder: Union[str, Path],
    repo_id: str,
    cache_dir: Union[str, Path, None] = None,
    revision: str = "main",
    commit_hash: Optional[str] = None,
) -> Path:
    """Place a Hub folder into the Hugging Face cache the way ``hf_hub_download`` leaves it.

    Layout: ``<cache>/models--ORG--NAME/blobs/<etag>`` (sha256 for LFS files, the git blob id for
    the others, as the Hub's ETags), ``snapshots/<commit>/<file>`` symlinks to the blobs and
    ``refs/<revision>`` holding the commit. ``commit_hash`` defaults to a hash of the folder's
    content (not a Hub commit id). Afterwards ``from_pretrained(repo_id)`` works with
    ``HF_HUB_OFFLINE=1``. Returns the snapshot folder.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts)
    if not files:
        raise FileNotFoundError(f"no files in {folder}")
    etags = {}
    for path in files:
        if path.suffix == ".safetensors" or path.stat().st_size > _LFS_THRESHOLD:
            with path.open("rb") as f:
                etags[path] = sha_fileobj(f).hex()
        else:
            etags[path] = git_hash(path.read_bytes())
    if commit_hash is None:
        listing = "".join(f"{p.relative_to(folder).as_posix()}:{etags[p]}\n" for p in files)
        commit_hash = hashlib.sha1(listing.encode()).hexdigest()
    storage = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / commit_hash
    for path in files:
        blob = storage / "blobs" / etags[path]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        pointer = snapshot / path.relative_to(folder)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.unlink(missing_ok=True)
        try:  # relative link, as huggingface_hub makes; a copy where links are not supported
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        except OSError:
            shutil.copyfile(blob, pointer)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(storage / "refs" / revision, commit_hash)
    return snapshot


# ---------------------------------------------------------------------------------- the Space
_SPACE_APP = '''"""Hugging Face Space: attack an image and purify it with IMPure. Written by `impure publish --space`."""

import importlib.util
import subprocess
import sys

# torchattacks pins requests~=2.25.1, which it never uses and which pip cannot resolve together with the
# Hugging Face stack, so requirements.txt cannot list it: install it (and foolbox, whose labelled photos
# the page offers) without dependencies, as the package's install.sh does.
missing = [req for req in {no_deps!r} if importlib.util.find_spec(req.split("==")[0]) is None]
if missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *missing], check=True)

from impure_hf.app import build_app  # noqa: E402  (the copy of the package beside this file)

demo = build_app(model={model!r}, classifier={classifier!r})

if __name__ == "__main__":
    demo.launch()
'''

_SPACE_CARD = """
# IMPure: attack an image, then purify it

A classifier ({classifier}) is fooled by an adversarial attack; the IMPure purifier ({model})
rebuilds every image patch from the other patches, so the classifier sees the right class again.
Pick a photo or upload one, choose one of the paper's nine attacks and press the button.

This Space runs impure_hf {version} (the `impure_hf/` folder here), written by `impure publish --space`.
"""


def write_space(
    out_dir: PathLike,
    model: Optional[str] = None,
    classifier: str = "efficientnet_lite0",
) -> Path:
    """Write a Hugging Face Space folder (Gradio SDK) that serves the page of ``impure app``.

    The folder holds ``app.py`` (builds the page with [`build_app`]), ``requirements.txt`` (the
    package's requirements and the Gradio version installed here), ``README.md`` (the Space's
    front matter) and a copy of the ``impure_hf`` package, embedded model included, so the Space
    runs exactly this version. ``model`` is a preset name or Hub id (passed on as text) or a saved
    model folder (copied into ``model/``); None = the embedded default.
    """
    try:
        gradio_version = importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError('a Space pins the Gradio version installed here: pip install -e ".[app]"') from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(__file__).parent, out / "impure_hf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    dirs_exist_ok=True)
    models = [model] if model and "/" in model and not Path(model).exists() else []  # a Hub id: the card links it
    if model is not None and Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(f"{model} has no config.json: not a saved IMPure model folder")
        shutil.copytree(model, out / "model", dirs_exist_ok=True)
        model = "model"
    atomic_write_text(out / "app.py", _SPACE_APP.format(no_deps=NO_DEPS_REQUIREMENTS, model=model, classifier=classifier))
    requirements = [r for r in importlib.metadata.requires("impure_hf") or [] if "extra ==" not in r]
    atomic_write_text(out / "requirements.txt", "\n".join([*requirements, f"gradio=={gradio_version}"]) + "\n")
    card_data = SpaceCardData(
        title="IMPure: attack and purify",
        emoji="🛡️",
        colorFrom="indigo",
        colorTo="gray",
        sdk="gradio",
        sdk_version=gradio_version,
        app_file="app.py",
        license="apache-2.0",
        models=models or None,
        tags=["adversarial-purification", "adversarial-robustness", "impure"],
        short_description="Attack an image, then purify it with IMPure",
    )
    text = _SPACE_CARD.format(classifier=classifier, model=model or "the embedded default", version=__version__)
    atomic_write_text(out / "README.md", str(SpaceCard(f"---\n{card_data.to_yaml()}\n---\n{text}")))
    return out


def publish_space(
    model: Optional[str] = None,
    repo_id: Optional[str] = None,
    out_dir: Optional[PathLike] = None,
    dry_run: bool = False,
    private: bool = False,
    token: Optional[str] = None,
) -> Path:
    """Write the Space folder ([`write_space`]) and, unless ``dry_run``, upload it to the Space ``repo_id``."""
    if not dry_run and (not repo_id or repo_id.count("/") != 1):
        raise ValueError(f"--repo-id must be ORG/NAME of the Space, got {repo_id!r}")
    out = write_space(out_dir or "impure-space", model=model)
    if not dry_run:
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        print(api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=str(out),
                                commit_message="Upload the IMPure demo page").commit_url)
    return out



__all__ = [
    "GITHUB_REPO",
    "MODEL_CARD_TEMPLATE",
    "NO_DEPS_REQUIREMENTS",
    "add_to_hf_cache",
    "build_model_card",
    "check_hub_folder",
    "load_eval_results",
    "publish",
    "publish_space",
    "save_hub_folder",
    "upload_hub_folder",
    "validate_model_card",
    "write_space",
]
