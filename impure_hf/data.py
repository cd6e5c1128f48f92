"""Adversarial image pairs as a Hugging Face dataset: build (``impure make-dataset``), load, transform.

Each row is one image attacked by one attack against one classifier:

| column | type | meaning |
|---|---|---|
| clean | Image (PNG) | the image as the classifier saw it, ``image_size`` square |
| adversarial | Image (PNG, lossless) | the attacked image, rounded to 8 bits (within ``eps`` for L_inf attacks) |
| label | ClassLabel (ImageNet names) | true class, or the classifier's clean prediction for unlabelled photos |
| attack / classifier | string | attack name (``impure_hf.attacks.ATTACKS``) and target classifier |
| eps | float64 or null | L_inf budget; null for the L2 attacks (CW, DeepFool) |
| source_id | string | where the clean image came from (file, crop index) |

Sources:

- ``"offline"`` (no download): the test split is foolbox's 20 labelled ImageNet photos; train and
  validation are seeded random square crops (scale, flip) of real photos shipped by
  scikit-image, scikit-learn and matplotlib, with disjoint photos for the two splits
  (``OFFLINE_PHOTOS``), labelled by the classifier's clean prediction.
- an ImageNet folder in ImageFolder layout (``ROOT/train/<wnid>/*.JPEG``, ``ROOT/val/<wnid>/*``),
  with the paper's selection: per class, the first ``train_size`` (10) train images and
  ``validation_size`` / ``test_size`` (5 / 5) val images that the classifier gets right, in a
  seeded order; validation and test draw from disjoint halves of each class's val images.
- any other image folder, labelled for the target classifier (fine-tuning for your own classifier):
  ``ROOT/train/`` and ``ROOT/val/``, or ``ROOT`` alone (then a seeded ``validation_fraction`` of
  each class is held out for validation), each holding class folders named by the classifier's
  labels or class indices (sorted folder order for a classifier without names), or bare images
  labelled by the classifier's clean prediction; all images per class unless sizes are given.

Only correctly classified images are attacked, as in the paper. The build writes shards
(``data/<split>-<i>-of-<n>.parquet``); a killed build rerun with the same arguments skips the
finished shards and yields the same dataset as an uninterrupted one (every random draw is seeded
per shard). ``num_proc`` worker processes or ``accelerate launch`` processes each write their own
shards; the main process writes the dataset card (README.md) with counts and success rates.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Union

import datasets
import pyarrow.parquet as pq
import torch
from datasets import ClassLabel, Dataset, Features, Value, load_dataset
from huggingface_hub import DatasetCard, DatasetCardData
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from ._utils import (  # noqa: F401  (iter_image_files: its old home)
    CorruptFileError,
    atomic_write_json,
    atomic_write_text,
    iter_image_files,
    parse_eps,
    process_state,
    read_json,
)
from .photos import (  # noqa: F401  (their old home was here)
    OFFLINE_PHOTOS,
    foolbox_imagenet_samples,
    package_data_dir,
    package_file,
    random_photo_crops,
)
from ._version import __version__
from .attacks import ATTACK_NORMS, ATTACKS, attack_images, attack_success, check_eps, make_attack, round_to_uint8
from .classifiers import load_classifier, predict
from .data_sources import (  # noqa: F401  (class_indices: for users of this module)
    SPLITS,
    Candidate,
    Pool,
    class_indices,
    derive_seed,
    folder_kind,
    folder_layout,
    folder_pools,
    load_pixels,
    offline_pools,
)
from .image_processing_impure import ImpureImageProcessor

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
COLUMNS = ("clean", "adversarial", "label", "attack", "classifier", "eps", "source_id")
# Settings and per-shard statistics; a shard is finished once its statistics exist. Hidden, so
# datasets' split detection (which matches "train-*" anywhere) never takes them for data.
BUILD_DIR = ".build"
# 2: whole images framed by the processor's one rule (shortest edge = side, centre crop); a build of
# version 1 (0.875 centre crop) is not resumed with the other framing
FORMAT_VERSION = 2

# per split: images (offline) or images per class (folders); None: all of them
_DEFAULT_SIZES = {
    "offline": {"train": 64, "validation": 16, "test": 20},
    "imagenet": {"train": 10, "validation": 5, "test": 5},  # the paper's selection
    "folder": {"train": None, "validation": None, "test": None},
}


# ------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class _Shard:
    split: str
    index: int
    count: int
    pools: tuple[Pool, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}"


def _plan(settings: dict) -> list[_Shard]:
    shards = []
    for split in settings["splits"]:
        size = settings["sizes"][split]
        if settings["source"] == "offline":
            pools = offline_pools(split, size, settings["seed"], settings.get("extra_train_photos", ()))
        else:
            pools = folder_pools(settings, split)
        step = settings["shard_size"]
        count = max(1, -(-len(pools) // step))
        shards += [_Shard(split, i, count, tuple(pools[i * step : (i + 1) * step])) for i in range(count)]
    return shards


# ------------------------------------------------------------------------------- building shards
def adversarial_features(label_names: Sequence[str]):
    """The dataset's ``datasets.Features`` for classifiers with these class names."""
    return Features(
        clean=datasets.Image(),
        adversarial=datasets.Image(),
        label=ClassLabel(names=list(label_names)),
        attack=Value("string"),
        classifier=Value("string"),
        eps=Value("float64"),
        source_id=Value("string"),
    )


def _write_shard(out: Path, shard: _Shard, rows: dict, stats: dict, features) -> None:
    """Write the shard's parquet file (none if it has no rows: datasets rejects empty splits), then
    its statistics, which mark it finished. Both writes are atomic."""
    data_path = out / "data" / f"{shard.name}.parquet"
    if rows["label"]:
        temporary = data_path.with_name(f".{data_path.name}.tmp")  # hidden: datasets ignores it
        # the arrow table's schema metadata carries the features (Image, ClassLabel names) into the file
        pq.write_table(Dataset.from_dict(rows, features=features).data.table, temporary)
        os.replace(temporary, data_path)
    else:
        data_path.unlink(missing_ok=True)
    stats_path = out / BUILD_DIR / f"{shard.name}.json"
    atomic_write_json(stats_path, stats, indent=1)


class _ShardBuilder:
    """Builds and writes one shard at a time; holds the classifiers and their attacks."""

    def __init__(self, settings: dict, classifiers: list, out: Path):
        self.settings, self.classifiers, self.out = settings, classifiers, out
        self.attacks = [[make_attack(name, c, eps=settings["eps"]) for name in settings["attacks"]] for c in classifiers]
        self.features = adversarial_features(settings["label_names"])

    def _select(self, pools: Sequence[Pool], classifier, pixels) -> tuple[list, int]:
        """(source_id, image, label) of each pool's first ``quota`` correctly classified candidates."""
        chosen, misclassified = [], 0
        for pool in pools:
            taken, position = 0, 0
            while taken < pool.quota and position < len(pool.candidates):
                chunk = pool.candidates[position : position + pool.quota - taken]
                position += len(chunk)
                loaded = [(c, pixels(c)) for c in chunk]
                loaded = [(c, image) for c, image in loaded if image is not None]
                if not loaded:
                    continue
                predictions = predict(classifier, torch.stack([image for _, image in loaded]))
                for (candidate, image), prediction in zip(loaded, predictions.tolist()):
                    label = prediction if candidate.label is None else candidate.label
                    if prediction == label:
                        chosen.append((candidate.source_id, image, label))
                        taken += 1
                    else:
                        misclassified += 1
        return chosen, misclassified

    def __call__(self, shard: _Shard) -> dict:
        settings = self.settings
        cache: dict[str, Optional[torch.Tensor]] = {}  # decoded once, shared by the classifiers

        def pixels(candidate: Candidate) -> Optional[torch.Tensor]:
            if candidate.source_id not in cache:
                cache[candidate.source_id] = load_pixels(candidate, settings["image_size"])
            return cache[candidate.source_id]

        rows = {column: [] for column in COLUMNS}
        stats = {"split": shard.split, "shard": shard.index, "selected": {}, "misclassified": {}, "attacks": {}}
        for c, (classifier, attacks) in enumerate(zip(self.classifiers, self.attacks)):
            chosen, stats["misclassified"][classifier.name] = self._select(shard.pools, classifier, pixels)
            stats["selected"][classifier.name] = len(chosen)
            stats["attacks"][classifier.name] = {}
            device = next(classifier.parameters()).device
            for name, attack in zip(settings["attacks"], attacks):
                eps = settings["eps"] if ATTACK_NORMS[name] == "Linf" else None
                counts = {"images": 0, "success": 0, "success_rounded": 0}
                for b in range(0, len(chosen), settings["batch_size"]):
                    batch = chosen[b : b + settings["batch_size"]]
                    images = torch.stack([image for _, image, _ in batch])
                    labels = torch.tensor([label for _, _, label in batch])
                    seed = derive_seed(settings["seed"], SPLITS.index(shard.split), shard.index, c, list(ATTACKS).index(name), b)
                    adversarial = attack_images(attack, images.to(device), labels.to(device), seed=seed).cpu()
                    rounded = round_to_uint8(adversarial, images, eps)
                    counts["images"] += len(batch)
                    counts["success"] += int(attack_success(classifier, adversarial, labels).sum())
                    counts["success_rounded"] += int(attack_success(classifier, rounded, labels).sum())
                    rows["clean"] += ImpureImageProcessor.post_process(images)
                    rows["adversarial"] += ImpureImageProcessor.post_process(rounded)
                    rows["label"] += labels.tolist()
                    rows["attack"] += [name] * len(batch)
                    rows["classifier"] += [classifier.name] * len(batch)
                    rows["eps"] += [eps] * len(batch)
                    rows["source_id"] += [source_id for source_id, _, _ in batch]
                stats["attacks"][classifier.name][name] = counts
        stats["rows"] = len(rows["label"])
        stats["undecodable"] = sorted(source_id for source_id, image in cache.items() if image is None)
        _write_shard(self.out, shard, rows, stats, self.features)
        return stats


_WORKER_BUILDER: Optional[_ShardBuilder] = None


def _init_worker(settings: dict, classifiers: list, out: Path, threads: int) -> None:
    global _WORKER_BUILDER
    torch.set_num_threads(threads)
    _WORKER_BUILDER = _ShardBuilder(settings, classifiers, out)


def _run_worker(shard: _Shard) -> dict:
    return _WORKER_BUILDER(shard)


# ------------------------------------------------------------------------------- the build
def _shard_done(stats_path: Path) -> bool:
    """A shard is finished when its statistics file exists and reads; a corrupt one is built again."""
    if not stats_path.exists():
        return False
    try:
        read_json(stats_path)
    except CorruptFileError as err:
        logger.warning("%s: building the shard again", err)
        return False
    return True


def _prepare_output(out: Path, settings: dict, overwrite: bool) -> None:
    """Start a build in ``out``, or check that the build already there has the same settings."""
    config_path = out / BUILD_DIR / "config.json"
    if out.exists() and any(out.iterdir()) and not config_path.exists():
        raise FileExistsError(f"{out} exists and is not an adversarial dataset build; choose an empty or new folder")
    if overwrite and config_path.exists():
        shutil.rmtree(out)
    if config_path.exists():
        previous = read_json(config_path, hint="delete the folder or rerun with --overwrite")
        if previous != settings:
            changed = sorted(k for k in settings.keys() | previous.keys() if previous.get(k) != settings.get(k))
            raise ValueError(
                f"{out} holds a build with other settings (differing: {', '.join(changed)}); "
                "rerun with the same arguments to resume, or pass overwrite=True (--overwrite)"
            )
        return
    (out / BUILD_DIR).mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    atomic_write_json(config_path, settings, indent=1)


def build_adversarial_dataset(
    output_dir: PathLike,
    classifiers: Union[str, torch.nn.Module, Sequence[Union[str, torch.nn.Module]]] = "efficientnet_lite0",
    attacks: Optional[Sequence[str]] = None,
    eps: float = 16 / 255,
    source: PathLike = "offline",
    splits: Sequence[str] = SPLITS,
    train_size: Optional[int] = None,
    validation_size: Optional[int] = None,
    test_size: Optional[int] = None,
    image_size: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 16,
    shard_size: int = 8,
    num_proc: int = 1,
    device: Union[str, torch.device, None] = None,
    overwrite: bool = False,
    progress: bool = True,
    extra_train_photos: Sequence[PathLike] = (),
    validation_fraction: float = 0.2,
    threads: int = 1,
) -> Path:
    """Build (or resume) an adversarial dataset folder loadable with [`load_adversarial_dataset`].

    Args:
        output_dir: folder to write (parquet shards, ``.build/`` settings and statistics, README.md card).
        classifiers: target(s): names for [`load_classifier`] or [`ImageClassifier`] objects
            (recorded by their ``.name``); all must share one label set.
        attacks: names from ``impure_hf.attacks.ATTACKS`` (default: all nine).
        eps: L_inf budget in [0, 1] pixel units.
        source: ``"offline"``, an ImageNet folder, or any image folder labelled for the
            classifier (see the module docstring).
        splits: which of train / validation / test to build.
        train_size / validation_size / test_size: offline: number of images (test: at most
            foolbox's 20; default 64 / 16 / 20); ImageNet folder: images per class (10 / 5 / 5);
            other image folders: images per class (default: all).
        image_size: side of the stored images (default: the first classifier's input size).
        seed: seeds the crops, the ImageNet order and the attacks' random draws.
        batch_size: images per attack call.
        shard_size: source entries per shard (offline images, or ImageNet classes).
        num_proc: worker processes on this machine (each writes its own shards). Under
            ``accelerate launch`` every launched process takes a share of the shards instead.
        device: where to run the classifiers (default: accelerate's device for this process,
            a GPU when there is one). Classifier objects are moved there and set to eval mode.
        threads: torch threads per building process, pinned for the whole build and recorded in its
            settings: PGD's sign steps turn the rounding differences of another thread count (or CPU)
            into different adversarial images, so a build is exact per machine and thread count; a
            resume with another count is refused rather than mixing shards.
        overwrite: delete an existing build in ``output_dir`` first (never other folders).
        progress: show a progress bar (main process only).
        extra_train_photos: offline source: more photo files or folders whose random crops join
            the train split's (taken in turn with the packaged photos), e.g. a distribution's
            wallpaper photos. Their resolved paths are part of the build's settings.
        validation_fraction: an image folder without ``val/``: the share of each class's images
            held out for validation (seeded).

    Returns:
        ``output_dir`` as a Path.
    """

    state = process_state()
    if num_proc < 1 or (num_proc > 1 and state.num_processes > 1):
        raise ValueError(f"num_proc must be >= 1, and 1 under accelerate launch (which starts the processes); got {num_proc}")
    attacks = [a.lower() for a in (attacks or ATTACKS)]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    eps = check_eps(eps)
    if not splits or any(s not in SPLITS for s in splits):
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {list(splits)}")
    if source != "offline":
        source = Path(source).resolve()
        if not source.is_dir():
            raise FileNotFoundError(f"image folder not found: {source} (or use source='offline')")
    kind = "offline" if source == "offline" else folder_kind(source)
    if extra_train_photos and kind != "offline":
        raise ValueError("extra_train_photos add to the offline source's train split; an image folder has its own images")
    extra = [str(path.resolve()) for path in iter_image_files(extra_train_photos)] if extra_train_photos else []
    given = {"train": train_size, "validation": validation_size, "test": test_size}
    sizes = {s: _DEFAULT_SIZES[kind][s] if given[s] is None else given[s] for s in splits}
    counts = {**{f"{s}_size": v for s, v in sizes.items() if v is not None}, "batch_size": batch_size, "shard_size": shard_size}
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {validation_fraction}")

    if isinstance(classifiers, (str, torch.nn.Module)):
        classifiers = [classifiers]
    device = device if device is not None else state.device
    classifiers = [load_classifier(c, device) if isinstance(c, str) else c.to(device).eval() for c in classifiers]
    names = [c.name for c in classifiers]
    if len(set(names)) != len(names):
        raise ValueError(f"classifier names must be unique (they label the rows), got {names}")
    label_names = [c.labels or [str(i) for i in range(c.num_classes)] for c in classifiers]
    if any(names != label_names[0] for names in label_names):
        raise ValueError("all classifiers must share one label set (e.g. ImageNet-1k)")
    if len(label_names[0]) != 1000 and (kind == "imagenet" or (kind == "offline" and "test" in splits)):
        raise ValueError("labelled ImageNet sources (the ImageNet folder, the offline test split) need 1000-class ImageNet classifiers")

    settings = {
        "format_version": FORMAT_VERSION,
        "classifiers": names,
        "attacks": attacks,
        "eps": eps,
        "source": str(source),
        "splits": [s for s in SPLITS if s in splits],
        "sizes": sizes,
        "image_size": image_size or classifiers[0].input_size,
        "seed": seed,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "label_names": label_names[0],
    }
    # only when used, so that earlier builds keep their settings (and resume)
    if extra:
        settings["extra_train_photos"] = extra
    if kind != "offline" and folder_layout(source)["val"] is None:
        settings["validation_fraction"] = validation_fraction
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    settings["threads"] = threads
    plan = _plan(settings)  # lists the sources: raises on an empty folder before anything is written
    out = Path(output_dir)
    if state.is_main_process:
        _prepare_output(out, settings, overwrite)
    state.wait_for_everyone()
    pending = [shard for shard in plan if not _shard_done(out / BUILD_DIR / f"{shard.name}.json")]
    state.wait_for_everyone()  # every process sees the same pending list before any writes
    hide_bar = not (progress and state.is_main_process)
    workers = num_proc if num_proc > 1 else state.num_processes
    if state.is_main_process:
        print(f"{len(pending)} of {len(plan)} shards to build on {workers} process(es)", flush=True)
    if num_proc > 1 and pending:
        context = multiprocessing.get_context("spawn")  # fork is unsafe once torch threads exist
        with context.Pool(num_proc, _init_worker, (settings, classifiers, out, threads)) as pool:
            done = pool.imap_unordered(_run_worker, pending)
            for _ in tqdm(done, total=len(pending), desc="adversarial shards", unit="shard", disable=hide_bar):
                pass
    else:
        mine = pending[state.process_index :: state.num_processes]
        builder = _ShardBuilder(settings, classifiers, out) if mine else None
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for shard in tqdm(mine, desc="adversarial shards", unit="shard", disable=hide_bar):
                builder(shard)
        finally:
            torch.set_num_threads(before)
    state.wait_for_everyone()
    if state.is_main_process:
        _write_card(out, settings, plan)
    return out


# ------------------------------------------------------------------------------- the card
def _summarise(out: Path, plan: list[_Shard]) -> dict:
    summary: dict = {}
    for shard in plan:
        stats = read_json(out / BUILD_DIR / f"{shard.name}.json")
        split = summary.setdefault(shard.split, {"rows": 0, "undecodable": 0, "selected": {}, "misclassified": {}, "attacks": {}})
        split["rows"] += stats["rows"]
        split["undecodable"] += len(stats["undecodable"])
        for key in ("selected", "misclassified"):
            for classifier, n in stats[key].items():
                split[key][classifier] = split[key].get(classifier, 0) + n
        for classifier, per_attack in stats["attacks"].items():
            for attack, counts in per_attack.items():
                total = split["attacks"].setdefault((classifier, attack), dict.fromkeys(counts, 0))
                for key, n in counts.items():
                    total[key] += n
    return summary


def _write_card(out: Path, settings: dict, plan: list[_Shard]) -> None:

    summary = _summarise(out, plan)
    empty = [split for split, s in summary.items() if not s["rows"]]
    if empty:
        logger.warning("no rows in split(s) %s: left out of the dataset (see the card)", empty)
    total_rows = sum(s["rows"] for s in summary.values())
    size_category = next(c for limit, c in ((1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M"), (float("inf"), "n>1M")) if total_rows < limit)
    card_data = DatasetCardData(
        pretty_name="IMPure adversarial image pairs",
        task_categories=["image-classification"],
        tags=["adversarial-attacks", "adversarial-purification", "impure"],
        size_categories=size_category,
    )  # no `configs`: datasets finds the splits from the file names, and with `configs` it caches
    # a local folder by the patterns alone, serving stale data after a rebuild (datasets 5.2)

    def percent(n: int, d: int) -> str:
        return f"{100 * n / d:.1f}" if d else "n/a"

    source = "offline photos (foolbox, scikit-image, scikit-learn, matplotlib)" if settings["source"] == "offline" else f"image folder `{settings['source']}`"
    lines = [
        "# IMPure adversarial image pairs",
        "",
        f"Built by `impure make-dataset` (impure_hf {__version__}). Each row pairs a clean image with its adversarial "
        "version crafted against one classifier by one attack. Load with "
        "`impure_hf.data.load_adversarial_dataset(path)` or `datasets.load_dataset(path)`.",
        "",
        "## Settings",
        "",
        f"- classifiers: {', '.join(settings['classifiers'])}",
        f"- attacks: {', '.join(settings['attacks'])} (settings: `impure_hf.attacks`)",
        f"- eps (L_inf attacks): {settings['eps']:.6f} = {Fraction(settings['eps']).limit_denominator(1000)}; CW and DeepFool are L2, unbounded",
        f"- source: {source}; sizes ({'images per class' if settings['source'] != 'offline' else 'images'}): "
        + ", ".join(f"{split} {n}" for split, n in settings["sizes"].items()),
        f"- image size {settings['image_size']} px, seed {settings['seed']}, batch size {settings['batch_size']}",
        f"- {settings.get('threads', 'unrecorded')} torch thread(s) per process: the adversarial images are exact for "
        "this machine and thread count (PGD's sign steps turn other rounding into other images), not across machines",
        "",
        "## Counts",
        "",
        "| split | rows | attacked images per classifier | dropped (misclassified clean) | undecodable files skipped |",
        "|---|---|---|---|---|",
    ]
    if empty:
        lines[-2:-2] = [f"Split(s) without rows, left out of the dataset: {', '.join(empty)}.", ""]
    for split, s in summary.items():
        selected = ", ".join(f"{c}: {n}" for c, n in s["selected"].items())
        dropped = ", ".join(f"{c}: {n}" for c, n in s["misclassified"].items())
        lines.append(f"| {split} | {s['rows']} | {selected} | {dropped} | {s['undecodable']} |")
    lines += [
        "",
        "## Attack success rate",
        "",
        "Percentage of attacked images the classifier misclassifies, on the attack's float output and on the stored "
        "8-bit image.",
        "",
        "| split | classifier | attack | norm | images | success % (float) | success % (stored, 8-bit) |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, s in summary.items():
        for (classifier, attack), c in s["attacks"].items():
            lines.append(
                f"| {split} | {classifier} | {attack} | {ATTACK_NORMS[attack]} | {c['images']} | "
                f"{percent(c['success'], c['images'])} | {percent(c['success_rounded'], c['images'])} |"
            )
    lines += [
        "",
        "## Columns",
        "",
        "clean and adversarial (PNG images), label (the classifier's class; for unlabelled photos the classifier's clean "
        "prediction), attack, classifier, eps (null for L2 attacks), source_id.",
        "",
        "## Sources and licences",
        "",
        "Offline photos come from the packages that ship them (scikit-image, scikit-learn, matplotlib: see their "
        "licences and data READMEs; foolbox's ImageNet samples). ImageNet images remain under the ImageNet terms of access.",
        "",
    ]
    extra = settings.get("extra_train_photos") or []
    if extra:
        folders = sorted({str(Path(path).parent) for path in extra})
        lines += [
            f"The train split also crops {len(extra)} extra photo file(s) given with `--extra-train-photos`, from "
            + ", ".join(f"`{folder}`" for folder in folders)
            + "; they stay under the licences of whoever ships them (for a Debian package: "
            "`/usr/share/doc/<package>/copyright`, and `dpkg -S <file>` names the package). Files: "
            + ", ".join(f"`{Path(path).name}`" for path in extra)
            + ".",
            "",
        ]
    atomic_write_text(out / "README.md", str(DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))))


# ------------------------------------------------------------------------------- loading
def load_adversarial_dataset(path_or_id: PathLike, split: Optional[str] = None, streaming: bool = False):
    """A built adversarial dataset (folder or Hub id) as a ``DatasetDict``, or one ``split``.

    Use ``dataset.with_transform(to_tensors)`` for training tensors.
    """
    path = Path(path_or_id)
    if path.is_dir() and not (path / "README.md").exists():
        if (path / BUILD_DIR / "config.json").exists():
            raise FileNotFoundError(f"{path} is an unfinished build: rerun `impure make-dataset` with the same arguments to resume it")
        raise FileNotFoundError(f"{path} is not an adversarial dataset folder (no README.md)")
    dataset = load_dataset(str(path_or_id), split=split, streaming=streaming)
    features = dataset.features if split is not None else next(iter(dataset.values())).features
    missing = [column for column in COLUMNS if features is not None and column not in features]
    if missing:
        raise ValueError(f"{path_or_id} is not an adversarial dataset: missing column(s) {missing}")
    return dataset


def to_tensors(batch: dict) -> dict:
    """``datasets`` transform: the clean / adversarial images of a batch -> float tensors (3, S, S) in [0, 1].

    Other columns pass through unchanged; pick the ones a DataLoader should collate with
    ``dataset.with_transform(to_tensors, columns=["clean", "adversarial", "label"])``.
    """
    out = dict(batch)
    for column in ("clean", "adversarial"):
        if column in batch:
            out[column] = [pil_to_tensor(image.convert("RGB")).float() / 255 for image in batch[column]]
    return out


REQUIRED_COLUMNS = ("clean", "adversarial")  # what training needs of a pair dataset


def collate_pairs(processor: ImpureImageProcessor, rows: list[dict]) -> dict[str, torch.Tensor]:
    """A training batch of dataset rows: ``clean`` / ``adversarial`` pixel values (and ``labels``)."""
    batch = {key: processor([row[key] for row in rows])["pixel_values"] for key in REQUIRED_COLUMNS}
    if "label" in rows[0]:
        batch["labels"] = torch.tensor([row["label"] for row in rows], dtype=torch.long)
    return batch


def random_crop_pairs(
    clean: torch.Tensor, adversarial: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random square crop, and a random horizontal flip, of each clean/adversarial pair.

    Training on crops is far cheaper than on whole images, and the purifier works on any window of
    its position grid (the release trains 224 px windows of a 448 px table the same way).
    """
    n, _, height, width = clean.shape
    if size > min(height, width):
        raise ValueError(f"train_crop_size {size} is larger than the training images ({height}x{width})")
    device = generator.device
    tops = torch.randint(0, height - size + 1, (n,), generator=generator, device=device).tolist()
    lefts = torch.randint(0, width - size + 1, (n,), generator=generator, device=device).tolist()
    flips = torch.rand(n, generator=generator, device=device).lt(0.5).tolist()
    crops = []
    for images in (clean, adversarial):
        out = torch.stack([images[i, :, t : t + size, l : l + size] for i, (t, l) in enumerate(zip(tops, lefts))])
        flip = torch.tensor(flips, device=out.device).view(n, 1, 1, 1)
        crops.append(torch.where(flip, out.flip(-1), out))
    return crops[0], crops[1]


def check_columns(dataset, name: str = "dataset") -> None:
    """Raise a clear error unless ``dataset`` has the ``clean`` and ``adversarial`` image columns."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # a stream without declared features: look at the first row
        columns = list(next(iter(dataset)).keys())
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"the {name} lacks the column(s) {missing} (it has {list(columns)}); IMPure training needs the "
            "image columns 'clean' and 'adversarial' (optionally 'label'), as built by `impure make-dataset`"
        )


__all__ = [
    "COLUMNS",
    "OFFLINE_PHOTOS",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "adversarial_features",
    "build_adversarial_dataset",
    "check_columns",
    "class_indices",
    "collate_pairs",
    "foolbox_imagenet_samples",
    "load_adversarial_dataset",
    "package_data_dir",
    "package_file",
    "parse_eps",
    "random_crop_pairs",
    "random_photo_crops",
    "to_tensors",
]
