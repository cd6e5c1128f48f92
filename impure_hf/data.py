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

Only correctly classified images are attacked, as in the paper. The build writes shards
(``data/<split>-<i>-of-<n>.parquet``); a killed build rerun with the same arguments skips the
finished shards and yields the same dataset as an uninterrupted one (every random draw is seeded
per shard). ``num_proc`` worker processes or ``accelerate launch`` processes each write their own
shards; the main process writes the dataset card (README.md) with counts and success rates.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
from dataclasses import dataclass
from fractions import Fraction
from importlib.util import find_spec
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ._utils import CorruptFileError, atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
SPLITS = ("train", "validation", "test")
COLUMNS = ("clean", "adversarial", "label", "attack", "classifier", "eps", "source_id")
# Settings and per-shard statistics; a shard is finished once its statistics exist. Hidden, so
# datasets' split detection (which matches "train-*" anywhere) never takes them for data.
BUILD_DIR = ".build"
FORMAT_VERSION = 1

# Real photos shipped inside installed packages, as "<package>/<file>" in the package's data
# folder (_PACKAGE_DATA). Train and validation use different photos, so validation never sees a
# crop of a training photo.
_PACKAGE_DATA = {"skimage": "data", "sklearn": "datasets/images", "matplotlib": "mpl-data/sample_data", "foolbox": "data"}
OFFLINE_PHOTOS: dict[str, tuple[str, ...]] = {
    "train": (
        "skimage/astronaut.png",
        "skimage/chelsea.png",
        "skimage/rocket.jpg",
        "skimage/motorcycle_left.png",
        "skimage/hubble_deep_field.jpg",
        "skimage/ihc.png",
        "skimage/camera.png",
        "skimage/coins.png",
        "sklearn/china.jpg",
        "matplotlib/Minduka_Present_Blue_Pack.png",
    ),
    "validation": (
        "skimage/coffee.png",
        "skimage/retina.jpg",
        "sklearn/flower.jpg",
        "matplotlib/grace_hopper.jpg",
    ),
}
CROP_SCALE = (0.25, 1.0)  # area fraction of the random square crops of the offline photos
_DEFAULT_SIZES = {"offline": {"train": 64, "validation": 16, "test": 20}, "imagenet": {"train": 10, "validation": 5, "test": 5}}


def package_data_dir(package: str) -> Path:
    """Data folder of an installed package (skimage, sklearn, matplotlib, foolbox), without importing it."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = {"skimage": "scikit-image", "sklearn": "scikit-learn"}.get(package, package)
        raise FileNotFoundError(f"the offline source needs the package {package!r}: pip install {pip_name}")
    return Path(spec.submodule_search_locations[0]) / _PACKAGE_DATA[package]


def package_file(name: str) -> Path:
    """Path of ``"<package>/<file>"`` (e.g. ``"skimage/astronaut.png"``) in an installed package's data folder."""
    package, _, filename = name.partition("/")
    path = package_data_dir(package) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}")
    return path


def foolbox_imagenet_samples() -> list[tuple[Path, int]]:
    """foolbox's 20 labelled ImageNet photos as (path, class index), read from its data folder."""
    paths = sorted(package_data_dir("foolbox").glob("imagenet_*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no imagenet_*.jpg photos in {package_data_dir('foolbox')}")
    return [(path, int(path.stem.split("_")[-1])) for path in paths]


def random_photo_crops(photos: Sequence[PathLike], n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) random square crops of ``photos`` (files, taken in turn), in [0, 1].

    Each side is drawn between a third of the photo's shorter side and all of it, then resized
    (bicubic); ``seed`` fixes every draw. For quick experiments and tests on real photos; the
    dataset builder draws its own crops per source entry (``_load_pixels``).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = [np.asarray(Image.open(path).convert("RGB")) for path in photos]
    crops = []
    for i in range(n):
        photo = arrays[i % len(arrays)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        pil = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
        crops.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1))
    return torch.stack(crops)


# ------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class _Candidate:
    source_id: str
    path: str
    label: Optional[int] = None  # None: use the classifier's clean prediction
    crop_seed: Optional[int] = None  # None: resize and centre-crop; else a seeded random crop


@dataclass(frozen=True)
class _Pool:
    """Candidates in order; the first ``quota`` the classifier gets right are attacked."""

    candidates: tuple[_Candidate, ...]
    quota: int


@dataclass(frozen=True)
class _Shard:
    split: str
    index: int
    count: int
    pools: tuple[_Pool, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}"


def _derive_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def _offline_pools(split: str, size: int, seed: int, extra_train_photos: Sequence[str] = ()) -> list[_Pool]:
    if split == "test":
        samples = foolbox_imagenet_samples()[:size]
        return [_Pool((_Candidate(f"foolbox/{path.name}", str(path), label),), 1) for path, label in samples]
    # (source id, file): packaged photos by package-relative name, extra photos by folder/name
    photos = [(name, str(package_file(name))) for name in OFFLINE_PHOTOS[split]]
    if split == "train":
        photos += [(f"{Path(path).parent.name}/{Path(path).name}", path) for path in extra_train_photos]
    pools = []
    for i in range(size):
        name, path = photos[i % len(photos)]
        crop_seed = _derive_seed(seed, SPLITS.index(split), i)
        pools.append(_Pool((_Candidate(f"{name}#crop{i:05d}", path, None, crop_seed),), 1))
    return pools


def _imagenet_pools(root: Path, split: str, per_class: int, seed: int) -> list[_Pool]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from .classifiers import IMAGENET_SYNSETS

    folder = root / ("train" if split == "train" else "val")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir()) if folder.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"no class folders in {folder}: the {split} split needs ImageFolder layout {folder}/<wnid>/*.JPEG")
    index = {wnid: i for i, wnid in enumerate(IMAGENET_SYNSETS)}
    unknown = [name for name in classes if name not in index]
    if unknown:
        raise ValueError(f"class folders of {folder} must be ImageNet WordNet ids (n01440764, ...); found {unknown[:5]}")
    pools, total = [], 0
    for wnid in classes:
        files = sorted(p for p in (folder / wnid).iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        label = index[wnid]
        random.Random(_derive_seed(seed, int(split != "train"), label)).shuffle(files)
        if split != "train":  # validation and test: disjoint halves of the same shuffled val images
            files = files[0::2] if split == "validation" else files[1::2]
        total += len(files)
        pools.append(_Pool(tuple(_Candidate(p.relative_to(root).as_posix(), str(p), label) for p in files), per_class))
    if total == 0:
        raise FileNotFoundError(f"no image files in the class folders of {folder}")
    return pools


def _plan(settings: dict) -> list[_Shard]:
    shards = []
    for split in settings["splits"]:
        size = settings["sizes"][split]
        if settings["source"] == "offline":
            pools = _offline_pools(split, size, settings["seed"], settings.get("extra_train_photos", ()))
        else:
            pools = _imagenet_pools(Path(settings["source"]), split, size, settings["seed"])
        step = settings["shard_size"]
        count = max(1, -(-len(pools) // step))
        shards += [_Shard(split, i, count, tuple(pools[i * step : (i + 1) * step])) for i in range(count)]
    return shards


# ------------------------------------------------------------------------------- building shards
def _load_pixels(candidate: _Candidate, image_size: int) -> Optional[torch.Tensor]:
    """(3, S, S) float image on the 8-bit grid, or None if the file cannot be decoded."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode, RandomResizedCrop

    from .image_processing_impure import ImpureImageProcessor, to_pil_rgb

    try:
        with Image.open(candidate.path) as image:
            image.load()
            pil = to_pil_rgb(image)
    except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        logger.warning("skipping %s: cannot decode (%s)", candidate.source_id, err)
        return None
    if candidate.crop_seed is None:
        return ImpureImageProcessor(crop_size=image_size)(pil)["pixel_values"][0]
    with torch.random.fork_rng(devices=[]):  # torchvision draws crop parameters from the global generator
        torch.manual_seed(candidate.crop_seed)
        top, left, height, width = RandomResizedCrop.get_params(pil, scale=list(CROP_SCALE), ratio=[1.0, 1.0])
        flip = bool(torch.rand(()) < 0.5)
    pil = TF.resized_crop(pil, top, left, height, width, [image_size, image_size], InterpolationMode.BICUBIC, antialias=True)
    if flip:
        pil = TF.hflip(pil)
    return TF.pil_to_tensor(pil).float() / 255


def adversarial_features(label_names: Sequence[str]):
    """The dataset's ``datasets.Features`` for classifiers with these class names."""
    from datasets import ClassLabel, Features, Image, Value

    return Features(
        clean=Image(),
        adversarial=Image(),
        label=ClassLabel(names=list(label_names)),
        attack=Value("string"),
        classifier=Value("string"),
        eps=Value("float64"),
        source_id=Value("string"),
    )


def _write_shard(out: Path, shard: _Shard, rows: dict, stats: dict, features) -> None:
    """Write the shard's parquet file (none if it has no rows: datasets rejects empty splits), then
    its statistics, which mark it finished. Both writes are atomic."""
    import pyarrow.parquet as pq
    from datasets import Dataset

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
        from .attacks import make_attack

        self.settings, self.classifiers, self.out = settings, classifiers, out
        self.attacks = [[make_attack(name, c, eps=settings["eps"]) for name in settings["attacks"]] for c in classifiers]
        self.features = adversarial_features(settings["label_names"])

    def _select(self, pools: Sequence[_Pool], classifier, pixels) -> tuple[list, int]:
        """(source_id, image, label) of each pool's first ``quota`` correctly classified candidates."""
        from .classifiers import predict

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
        from .attacks import ATTACK_NORMS, ATTACKS, attack_images, attack_success, round_to_uint8
        from .image_processing_impure import ImpureImageProcessor

        settings = self.settings
        cache: dict[str, Optional[torch.Tensor]] = {}  # decoded once, shared by the classifiers

        def pixels(candidate: _Candidate) -> Optional[torch.Tensor]:
            if candidate.source_id not in cache:
                cache[candidate.source_id] = _load_pixels(candidate, settings["image_size"])
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
                    seed = _derive_seed(settings["seed"], SPLITS.index(shard.split), shard.index, c, list(ATTACKS).index(name), b)
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


def process_state():
    """accelerate's process state; on CPUs (gloo) accelerate forms the process group only when told so."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


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
) -> Path:
    """Build (or resume) an adversarial dataset folder loadable with [`load_adversarial_dataset`].

    Args:
        output_dir: folder to write (parquet shards, ``.build/`` settings and statistics, README.md card).
        classifiers: target(s): names for [`load_classifier`] or [`ImageClassifier`] objects
            (recorded by their ``.name``); all must share one label set.
        attacks: names from ``impure_hf.attacks.ATTACKS`` (default: all nine).
        eps: L_inf budget in [0, 1] pixel units.
        source: ``"offline"`` or an ImageNet folder (see the module docstring).
        splits: which of train / validation / test to build.
        train_size / validation_size / test_size: offline: number of images (test: at most
            foolbox's 20; default 64 / 16 / 20); ImageNet folder: images per class (10 / 5 / 5).
        image_size: side of the stored images (default: the first classifier's input size).
        seed: seeds the crops, the ImageNet order and the attacks' random draws.
        batch_size: images per attack call.
        shard_size: source entries per shard (offline images, or ImageNet classes).
        num_proc: worker processes on this machine (each writes its own shards). Under
            ``accelerate launch`` every launched process takes a share of the shards instead.
        device: where to run the classifiers (default: accelerate's device for this process,
            a GPU when there is one). Classifier objects are moved there and set to eval mode.
        overwrite: delete an existing build in ``output_dir`` first (never other folders).
        progress: show a progress bar (main process only).
        extra_train_photos: offline source: more photo files or folders whose random crops join
            the train split's (taken in turn with the packaged photos), e.g. a distribution's
            wallpaper photos. Their resolved paths are part of the build's settings.

    Returns:
        ``output_dir`` as a Path.
    """
    from tqdm.auto import tqdm

    from .attacks import ATTACKS, check_eps
    from .classifiers import load_classifier

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
            raise FileNotFoundError(f"ImageNet folder not found: {source} (or use source='offline')")
    kind = "offline" if source == "offline" else "imagenet"
    if extra_train_photos and kind != "offline":
        raise ValueError("extra_train_photos add to the offline source's train split; an ImageNet folder has its own images")
    extra = [str(path.resolve()) for path in iter_image_files(extra_train_photos)] if extra_train_photos else []
    given = {"train": train_size, "validation": validation_size, "test": test_size}
    sizes = {s: _DEFAULT_SIZES[kind][s] if given[s] is None else given[s] for s in splits}
    for name, value in {**{f"{s}_size": v for s, v in sizes.items()}, "batch_size": batch_size, "shard_size": shard_size}.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

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
    if len(label_names[0]) != 1000 and (kind == "imagenet" or "test" in splits):
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
    if extra:  # only when given, so builds without extra photos keep their settings (and resume)
        settings["extra_train_photos"] = extra
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
        import multiprocessing

        threads = max(1, torch.get_num_threads() // num_proc)
        context = multiprocessing.get_context("spawn")  # fork is unsafe once torch threads exist
        with context.Pool(num_proc, _init_worker, (settings, classifiers, out, threads)) as pool:
            done = pool.imap_unordered(_run_worker, pending)
            for _ in tqdm(done, total=len(pending), desc="adversarial shards", unit="shard", disable=hide_bar):
                pass
    else:
        mine = pending[state.process_index :: state.num_processes]
        builder = _ShardBuilder(settings, classifiers, out) if mine else None
        for shard in tqdm(mine, desc="adversarial shards", unit="shard", disable=hide_bar):
            builder(shard)
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
    from huggingface_hub import DatasetCard, DatasetCardData

    from . import __version__
    from .attacks import ATTACK_NORMS

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

    source = "offline photos (foolbox, scikit-image, scikit-learn, matplotlib)" if settings["source"] == "offline" else f"ImageNet folder `{settings['source']}`"
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
        "clean and adversarial (PNG images), label (ImageNet class; for unlabelled photos the classifier's clean "
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
    from datasets import load_dataset

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
    from torchvision.transforms.functional import pil_to_tensor

    out = dict(batch)
    for column in ("clean", "adversarial"):
        if column in batch:
            out[column] = [pil_to_tensor(image.convert("RGB")).float() / 255 for image in batch[column]]
    return out


# ------------------------------------------------------------------------------- CLI
def parse_eps(text: str) -> float:
    """``"16/255"`` or ``"0.0627"`` -> float (argparse type)."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"eps must be a number or a fraction like 16/255, got {text!r}") from None


def _make_dataset(args: argparse.Namespace) -> int:
    attacks = None if args.attacks == ["all"] else args.attacks
    out = build_adversarial_dataset(
        args.output_dir,
        classifiers=args.classifier,
        attacks=attacks,
        eps=args.eps,
        source=args.source,
        splits=args.splits,
        train_size=args.train_size,
        validation_size=args.validation_size,
        test_size=args.test_size,
        image_size=args.image_size,
        seed=args.seed,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        num_proc=args.num_proc,
        device=args.device,
        overwrite=args.overwrite,
        extra_train_photos=args.extra_train_photos,
    )
    if process_state().is_main_process:
        print(f"adversarial dataset written to {out} (card: {out / 'README.md'})")
    return 0


def add_parser(subparsers) -> None:
    """Register ``impure make-dataset``."""
    parser = subparsers.add_parser(
        "make-dataset",
        help="build an adversarial (clean, adversarial) image-pair dataset",
        description="Attack images with the paper's attacks and save the pairs as a Hugging Face dataset folder "
        "(resumable; scale out with --num-proc or `accelerate launch -m impure_hf.cli make-dataset ...`).",
    )
    parser.add_argument("output_dir", help="dataset folder to write (rerun the same command to resume)")
    parser.add_argument("--source", default="offline", help="'offline' (packaged photos) or an ImageNet folder with train/ and val/ in ImageFolder layout")
    parser.add_argument("--extra-train-photos", nargs="+", default=[], metavar="PATH", help="offline source: more photo files or folders for the train split's random crops (e.g. /usr/share/backgrounds/mate/nature)")
    parser.add_argument("--classifier", nargs="+", default=["efficientnet_lite0"], help="target classifier name(s): efficientnet_lite0, timm names, transformers folders / Hub ids")
    parser.add_argument("--attacks", nargs="+", default=["all"], help="attack names (fgsm cw deepfool pgd mifgsm difgsm mdfgsm apgd-ce apgd-dlr) or 'all'")
    parser.add_argument("--eps", type=parse_eps, default=16 / 255, help="L_inf budget, e.g. 16/255 (default)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--train-size", type=int, default=None, help="offline: images (default 64); ImageNet: per class (10)")
    parser.add_argument("--validation-size", type=int, default=None, help="offline: images (16); ImageNet: per class (5)")
    parser.add_argument("--test-size", type=int, default=None, help="offline: foolbox photos (20); ImageNet: per class (5)")
    parser.add_argument("--image-size", type=int, default=None, help="stored image side (default: the classifier's input size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=8, help="offline images or ImageNet classes per shard")
    parser.add_argument("--num-proc", type=int, default=1, help="worker processes on this machine")
    parser.add_argument("--device", default=None, help="device of the classifiers (default: cpu, or accelerate's)")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing build in output_dir first")
    parser.set_defaults(func=_make_dataset)


__all__ = [
    "COLUMNS",
    "OFFLINE_PHOTOS",
    "SPLITS",
    "adversarial_features",
    "add_parser",
    "build_adversarial_dataset",
    "foolbox_imagenet_samples",
    "load_adversarial_dataset",
    "package_data_dir",
    "package_file",
    "parse_eps",
    "random_photo_crops",
    "to_tensors",
]
