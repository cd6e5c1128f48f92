"""``impure app``: attack an image and purify it in the browser (a Gradio page), and the same page as a Space.

The page is a thin layer over the package. [`AttackDemo`] does the work: it reads the image
([`read_image`]), crops it as the purifier expects (``ImpureImageProcessor``), attacks the
classifier with one of the paper's nine attacks (``impure_hf.attacks``), purifies the
adversarial image (``ImpureModel.purify``) and classifies all three (``impure_hf.classifiers``).
The page only shows what it returns: clean, adversarial and purified images, the amplified
perturbation, the top-5 classes of each and the time each step took. A second tab purifies an
image without attacking it (what ``impure purify`` does).

The purifier defaults to the embedded model (``impure_hf.DEFAULT_MODEL``); where this
installation has none, the untrained ``impure-vit-tiny`` preset stands in, with a note on the page.
Requests run one at a time through Gradio's queue.

Gradio is an optional extra (``pip install -e ".[app]"``), imported only when a page is built.

- CLI: ``impure app [--model NAME_OR_PATH] [--classifier NAME] [--host 127.0.0.1] [--port 7860]``;
  ``impure publish --space [MODEL] --out DIR --dry-run`` writes the Space folder ([`write_space`]).
- Python: ``build_app(model="impure-vit-tiny").launch()``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from ._utils import parse_eps
from .attacks import ATTACK_NORMS, ATTACKS, DEFAULT_EPS, attack_images, check_eps, make_attack, round_to_uint8
from .classifiers import load_classifier
from .configuration_impure import PRESETS
from .photos import foolbox_imagenet_samples, package_file
from .defended import amplified_perturbation
from .image_processing_impure import ImpureImageProcessor, to_pil_rgb
from .loading import load_purifier
from .precision import DTYPES, set_precision
from .publishing import publish_space, write_space  # noqa: F401  (their old home; `impure publish --space`)

FALLBACK_MODEL = "impure-vit-tiny"  # stands in (untrained) while the embedded default is missing
MAX_SIDE = 2048  # longer sides are shrunk before anything else: the purifier sees a small crop anyway
TOP_K = 5
# Real photos offered on the page besides foolbox's 20 labelled ImageNet photos ("<package>/<file>").
PHOTOS = (
    "skimage/chelsea.png",
    "skimage/coffee.png",
    "matplotlib/grace_hopper.jpg",
    "sklearn/china.jpg",
    "sklearn/flower.jpg",
    "skimage/astronaut.png",
    "skimage/rocket.jpg",
)

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------- images
def read_image(path: PathLike, max_side: int = MAX_SIDE) -> tuple[Image.Image, list[str]]:
    """An image file as an RGB PIL image, and notes on what was changed to get there.

    Images with a side over ``max_side`` are shrunk to fit (JPEGs decode at reduced size);
    grayscale, palette and CMYK images are converted to RGB and transparency is composited on
    white (``to_pil_rgb``). A file that is not a readable image raises a ValueError naming it.
    """
    name = Path(path).name
    notes = []
    try:
        image = Image.open(path)
        if max(image.size) > max_side:
            size = image.size
            image.thumbnail((max_side, max_side))
            notes.append(f"{name} is {size[0]}x{size[1]} pixels: resized to {image.width}x{image.height} first.")
        image.load()
    except Image.DecompressionBombError as err:
        raise ValueError(f"{name} is too large to decode safely: {err}") from None
    except UnidentifiedImageError:  # its message names the server-side path: say it without
        raise ValueError(f"{name} is not an image file that can be read (PNG, JPEG, WebP, BMP, TIFF, ...)") from None
    except OSError as err:  # e.g. a truncated file
        raise ValueError(f"{name} could not be decoded: {err}") from None
    if image.mode != "RGB":
        transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        notes.append(f"{name} has mode {image.mode}: converted to RGB"
                     + (", transparency composited on white." if transparent else "."))
        image = to_pil_rgb(image)
    return image, notes


def short_class_names(names: list[str]) -> list[str]:
    """Class names as the page shows them: the first WordNet lemma ("tench, Tinca tinca" -> "tench"),
    or the full name where two classes share that lemma (both "maillot" classes keep theirs)."""
    first = [name.split(", ")[0] for name in names]
    counts = Counter(first)
    return [short if counts[short] == 1 else name for short, name in zip(first, names)]


@contextmanager
def _timed(seconds: dict[str, float], step: str):
    start = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - start


# ---------------------------------------------------------------------------------- the pipeline
@dataclass
class AttackResult:
    """What the attack tab shows. Images are RGB PIL images of the purifier's input size."""

    clean: Image.Image
    adversarial: Image.Image
    perturbation: Image.Image  # amplified by ``amplification`` around grey
    purified: Image.Image
    top_k: dict[str, dict[str, float]]  # "clean" / "adversarial" / "purified" -> {short class name: probability}
    seconds: dict[str, float]  # step -> wall-clock seconds
    linf: float  # L_inf and L2 norms of the (8-bit) perturbation, in [0, 1] pixel units
    l2: float
    amplification: float
    notes: list[str] = field(default_factory=list)


@dataclass
class PurifyResult:
    """What the purify tab shows."""

    image: Image.Image
    purified: Image.Image
    top_k: dict[str, dict[str, float]]  # "image" / "purified" -> {class name: probability}
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)


class AttackDemo:
    """Attack one image, purify it and classify all versions: everything the page shows.

    Args:
        purifier: an ``ImpureModel`` (eval mode); its ``config.image_size`` is the working size.
        classifier: the target, a module taking [0, 1] images (``ImageClassifier``); its
            ``labels`` name the classes.
        seed: seeds the attacks' random starts and the purifier's noise, so a request repeated
            gives the same images.
        model_name: how the page names the purifier.
        note: shown on the page under the title (e.g. that the purifier is untrained).
    """

    def __init__(
        self,
        purifier: nn.Module,
        classifier: nn.Module,
        seed: int = 0,
        model_name: str = "custom",
        note: Optional[str] = None,
    ):
        self.purifier = purifier.eval()
        self.classifier = classifier.eval()
        self.seed = seed
        self.model_name = model_name
        self.note = note
        self.processor = ImpureImageProcessor(crop_size=purifier.config.image_size)
        self.device = next(purifier.parameters()).device
        labels = getattr(classifier, "labels", None)
        self.class_names = short_class_names(labels) if labels else None

    @classmethod
    def load(
        cls,
        model: Union[str, nn.Module, None] = None,
        classifier: Union[str, nn.Module] = "efficientnet_lite0",
        device: Union[str, torch.device, None] = None,
        seed: int = 0,
        dtype: str = "fp32",
    ) -> "AttackDemo":
        """Load the purifier (a module, a preset name, a folder, a Hub id or None for the embedded
        default, else the untrained fallback) and the classifier (a module or a name for
        ``load_classifier``)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        note = None
        if isinstance(model, nn.Module):
            purifier, name = model.to(device), getattr(model, "name_or_path", "") or type(model).__name__
        else:
            try:
                purifier = load_purifier(model, device=device)
                name = model or "embedded default"
            except FileNotFoundError:
                if model is not None:
                    raise
                purifier, name = load_purifier(FALLBACK_MODEL, device=device), FALLBACK_MODEL
                note = (f"The embedded default model is not in this installation yet: the page uses the **untrained** "
                        f"preset `{FALLBACK_MODEL}`. Everything runs, but the purified image is not purified.")
            if name in PRESETS and note is None:
                note = f"`{name}` is a preset, built **untrained**: the page runs, but the purified image is not purified."
        if hasattr(purifier, "autocast_dtype"):  # an ImpureModel: run it in the precision asked (auto: measured here)
            choice = set_precision(purifier, dtype)
            if dtype != "fp32":  # say what auto chose, or that bf16 was taken; plain fp32 needs no line
                print(choice, flush=True)
        if isinstance(classifier, str):
            classifier = load_classifier(classifier, device=device)
        return cls(purifier, classifier.to(device), seed=seed, model_name=str(name), note=note)

    def prepare(self, path: PathLike) -> tuple[torch.Tensor, list[str]]:
        """(1, 3, S, S) pixels in [0, 1] of an image file, centre-cropped to the purifier's size, and notes."""
        image, notes = read_image(path)
        return self.processor(image)["pixel_values"].to(self.device), notes

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor) -> tuple[dict[str, float], int]:
        """The classifier's top-5 classes of one image, {short class name: probability}, and the top-1 index."""
        probabilities = self.classifier(pixels).softmax(dim=-1)[0]
        values, indices = probabilities.topk(min(TOP_K, len(probabilities)))
        names = self.class_names or [str(i) for i in range(len(probabilities))]
        return {names[i]: float(p) for p, i in zip(values.tolist(), indices.tolist())}, int(indices[0])

    def purify(self, pixels: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        return self.purifier.purify(pixels, generator=generator)

    def attack(
        self,
        path: PathLike,
        attack: str = "pgd",
        eps: float = DEFAULT_EPS,
        on_pass: Optional[Callable[[int, Optional[int]], None]] = None,
    ) -> AttackResult:
        """Attack the image at ``path``, purify the adversarial image and classify all three.

        The attack's label is the classifier's clean top-1 class (the photos are unlabelled). The
        adversarial image is rounded to 8 bits (what a saved image keeps), inside ``eps`` for the
        L_inf attacks. ``on_pass(count, expected)`` is called on every classifier pass during the
        attack (``expected``: the attack's step count, or None), to show progress.
        """
        eps = check_eps(eps)
        clean, notes = self.prepare(path)
        seconds: dict[str, float] = {}
        with _timed(seconds, "classify clean"):
            clean_top, clean_class = self.classify(clean)
        attacker = make_attack(attack, self.classifier, eps=eps)
        expected = getattr(attacker, "steps", None)
        passes = 0

        def count(*_):
            nonlocal passes
            passes += 1
            on_pass(passes, expected)

        hook = self.classifier.register_forward_hook(count) if on_pass is not None else None
        try:
            with _timed(seconds, f"attack ({attack})"):
                label = torch.tensor([clean_class], device=self.device)
                adversarial = attack_images(attacker, clean, label, seed=self.seed)
        finally:
            if hook is not None:
                hook.remove()
        adversarial = round_to_uint8(adversarial, clean, eps if ATTACK_NORMS[attack.lower()] == "Linf" else None)
        with _timed(seconds, "classify adversarial"):
            adversarial_top, adversarial_class = self.classify(adversarial)
        with _timed(seconds, "purify"):
            purified = self.purify(adversarial)
        with _timed(seconds, "classify purified"):
            purified_top, _ = self.classify(purified)
        if adversarial_class == clean_class:
            notes.append(f"{attack} did not change the classifier's top class: try a larger eps or another attack.")
        perturbation, amplification = amplified_perturbation(clean, adversarial)
        delta = adversarial - clean
        images = self.processor.post_process(torch.cat([clean, adversarial, perturbation, purified]))
        return AttackResult(
            *images,
            top_k={"clean": clean_top, "adversarial": adversarial_top, "purified": purified_top},
            seconds=seconds,
            linf=float(delta.abs().max()),
            l2=float(delta.norm()),
            amplification=float(amplification[0]),
            notes=notes,
        )

    def purify_image(self, path: PathLike) -> PurifyResult:
        """Purify the image at ``path`` without attacking it, and classify it before and after."""
        pixels, notes = self.prepare(path)
        seconds: dict[str, float] = {}
        with _timed(seconds, "classify image"):
            image_top, _ = self.classify(pixels)
        with _timed(seconds, "purify"):
            purified = self.purify(pixels)
        with _timed(seconds, "classify purified"):
            purified_top, _ = self.classify(purified)
        image, purified_image = self.processor.post_process(torch.cat([pixels, purified]))
        return PurifyResult(image, purified_image, {"image": image_top, "purified": purified_top}, seconds, notes)


# ---------------------------------------------------------------------------------- the page
def _import_gradio():
    try:
        import gradio
    except ImportError:
        raise ImportError('the page needs Gradio, an optional extra: pip install -e ".[app]"') from None
    return gradio


def packaged_photos() -> list[Path]:
    """The real photos the page offers: ``PHOTOS`` and foolbox's labelled ImageNet photos, where installed."""
    photos = []
    for name in PHOTOS:
        try:
            photos.append(package_file(name))
        except FileNotFoundError:  # the package is not installed: offer the others
            continue
    try:
        photos.extend(path for path, _ in foolbox_imagenet_samples())
    except FileNotFoundError:
        pass
    return photos


def _uploaded_path(payload) -> str:
    """The server-side file of an image input (an unprocessed Gradio ``FileData`` payload)."""
    path = payload.get("path") if isinstance(payload, dict) else payload
    if not path:
        raise ValueError("no image: pick one of the photos below the image box, or upload an image")
    return path


def _parse_eps(text: str) -> float:
    try:
        return check_eps(parse_eps(str(text).strip()))
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise ValueError(f"eps {text!r} rejected: {err}") from None


def _markdown_notes(notes: list[str]) -> str:
    return "\n".join(f"- {note}" for note in notes)


def _markdown_seconds(seconds: dict[str, float]) -> str:
    rows = "\n".join(f"| {step} | {value:.2f} |" for step, value in seconds.items())
    return f"| step | seconds |\n|---|---|\n{rows}\n| **total** | **{sum(seconds.values()):.2f}** |"


def build_app(
    model: Union[str, nn.Module, None] = None,
    classifier: Union[str, nn.Module] = "efficientnet_lite0",
    *,
    device: Union[str, torch.device, None] = None,
    seed: int = 0,
    dtype: str = "fp32",
):
    """The page as a ``gradio.Blocks``; call ``.launch()`` on it.

    Args:
        model: the purifier: a module, preset name, saved folder or Hub id; None = the embedded
            default, or the untrained ``impure-vit-tiny`` preset (with a note) where it is missing.
        classifier: the target classifier: a module taking [0, 1] images or a ``load_classifier`` name.
        device: where the models run (default: CUDA if available, else CPU).
        seed: seed of the attacks' random starts and the purifier's noise.
        dtype: the purifier's precision: "fp32", "bf16" or "auto" (``impure_hf.precision``).
    """
    gr = _import_gradio()
    demo = AttackDemo.load(model, classifier, device=device, seed=seed, dtype=dtype)
    photos = [str(path) for path in packaged_photos()]

    @contextmanager
    def readable_errors():
        try:
            yield
        except ValueError as err:  # bad input: a message on the page, the app goes on serving
            raise gr.Error(str(err), print_exception=False) from err

    def run_attack(image, attack: str, eps: str, progress=gr.Progress()):
        def on_pass(count: int, expected: Optional[int]):
            progress((min(count, expected), expected) if expected else (count, None),
                     desc=f"{attack}: classifier passes", unit="passes")

        with readable_errors():
            result = demo.attack(_uploaded_path(image), attack, _parse_eps(eps), on_pass=on_pass)
        perturbation = (f"L∞ = {result.linf * 255:.0f}/255, L2 = {result.l2:.2f}; "
                        f"shown ×{result.amplification:.1f} around grey")
        return (result.clean, result.adversarial, result.perturbation, result.purified,
                result.top_k["clean"], result.top_k["adversarial"], result.top_k["purified"],
                perturbation, _markdown_notes(result.notes), _markdown_seconds(result.seconds))

    def run_purify(image):
        with readable_errors():
            result = demo.purify_image(_uploaded_path(image))
        return (result.image, result.purified, result.top_k["image"], result.top_k["purified"],
                _markdown_notes(result.notes), _markdown_seconds(result.seconds))

    def image_box(label: str, elem_id: str, **kwargs):
        return gr.Image(label=label, elem_id=elem_id, type="filepath", image_mode=None, height=240, **kwargs)

    def result_column(label: str, elem: str):
        """An output image over its top-5 classes (elem ids ``{elem}-image`` and ``{elem}-top``)."""
        with gr.Column(min_width=160):
            image = image_box(label, f"{elem}-image", interactive=False)
            return image, gr.Label(num_top_classes=TOP_K, label=f"{label}: top 5", elem_id=f"{elem}-top")

    size = demo.processor.crop_size["height"]
    with gr.Blocks(title="IMPure: attack and purify", analytics_enabled=False, fill_width=True) as app:
        gr.Markdown(
            "# IMPure: attack an image, then purify it\n"
            f"An attack changes the image slightly so that the classifier (`{getattr(demo.classifier, 'name', 'custom')}`) "
            f"sees another class; the purifier (`{demo.model_name}`) rebuilds every patch from the others, "
            f"so the classifier sees the right class again. Images are centre-cropped to {size}x{size}."
        )
        if demo.note:
            gr.Markdown(f"**Note:** {demo.note}", elem_id="model-note")
        with gr.Tab("Attack and purify"):
            with gr.Row():
                with gr.Column(scale=1, min_width=240):
                    attack_input = image_box("image", "attack-input", sources=["upload", "clipboard"])
                    gr.Examples([[p] for p in photos], inputs=[attack_input], label="packaged real photos",
                                examples_per_page=9, elem_id="attack-photos")
                    attack_name = gr.Dropdown(list(ATTACKS), value="pgd", label="attack", elem_id="attack-name")
                    eps = gr.Textbox(value="16/255", label="eps: L∞ budget (CW and DeepFool are L2 and ignore it)",
                                     elem_id="attack-eps")
                    attack_button = gr.Button("Attack and purify", variant="primary", elem_id="attack-run")
                with gr.Column(scale=4):
                    with gr.Row():
                        clean_image, clean_top = result_column("clean", "clean")
                        adversarial_image, adversarial_top = result_column("adversarial", "adversarial")
                        with gr.Column(min_width=160):
                            perturbation_image = image_box("perturbation (amplified)", "perturbation-image",
                                                           interactive=False)
                            perturbation_text = gr.Markdown(elem_id="perturbation-text")
                        purified_image, purified_top = result_column("purified", "purified")
                    attack_notes = gr.Markdown(elem_id="attack-notes")
                    attack_seconds = gr.Markdown(elem_id="attack-seconds")
        with gr.Tab("Purify an image"):
            with gr.Row():
                with gr.Column(scale=1, min_width=240):
                    purify_input = image_box("image", "purify-input", sources=["upload", "clipboard"])
                    gr.Examples([[p] for p in photos], inputs=[purify_input], label="packaged real photos",
                                examples_per_page=9, elem_id="purify-photos")
                    purify_button = gr.Button("Purify", variant="primary", elem_id="purify-run")
                with gr.Column(scale=4):
                    with gr.Row():
                        image_shown, image_top = result_column("image", "purify-original")
                        purified_only, purified_only_top = result_column("purified", "purify-purified")
                    purify_notes = gr.Markdown(elem_id="purify-notes")
                    purify_seconds = gr.Markdown(elem_id="purify-seconds")
        # preprocess=False: the handlers decode uploads themselves (read_image), so a broken file gets
        # a readable message; one shared concurrency slot: one request at a time runs the models
        attack_button.click(
            run_attack,
            inputs=[attack_input, attack_name, eps],
            outputs=[clean_image, adversarial_image, perturbation_image, purified_image, clean_top, adversarial_top,
                     purified_top, perturbation_text, attack_notes, attack_seconds],
            preprocess=False, concurrency_limit=1, concurrency_id="models", api_name="attack",
        )
        purify_button.click(
            run_purify,
            inputs=[purify_input],
            outputs=[image_shown, purified_only, image_top, purified_only_top, purify_notes, purify_seconds],
            preprocess=False, concurrency_limit=1, concurrency_id="models", api_name="purify",
        )
    return app.queue(default_concurrency_limit=1)


# ---------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``impure app``."""
    parser.add_argument("--model", default=None,
                        help="purifier: preset, folder or Hub id "
                             f"(default: the embedded model, else the untrained {FALLBACK_MODEL})")
    parser.add_argument("--classifier", default="efficientnet_lite0", help="target classifier (load_classifier name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts and the purifier's noise")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="purifier precision: auto (bf16 autocast only where measured faster here; default), fp32 or bf16")


def run(args: argparse.Namespace) -> int:
    """``impure app``: serve the page until interrupted."""
    app = build_app(args.model, args.classifier, device=args.device, seed=args.seed, dtype=args.dtype)
    app.launch(server_name=args.host, server_port=args.port, show_error=True)
    return 0


__all__ = [
    "FALLBACK_MODEL",
    "PHOTOS",
    "AttackDemo",
    "AttackResult",
    "PurifyResult",
    "build_app",
    "packaged_photos",
    "publish_space",
    "read_image",
    "short_class_names",
    "write_space",
]
