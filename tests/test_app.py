"""The demo page (``impure app``): the pipeline behind it, its Space folder, and the page itself driven
in headless Chromium (the distribution's package, through Playwright's Python API; never a download)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_model
from fixtures_data import lite0
from impure_hf.app import (
    FALLBACK_MODEL, MAX_SIDE, AttackDemo, _parse_eps, read_image, short_class_names,
)
from impure_hf.cli import main as cli_main
from impure_hf.data import package_file
from impure_hf.publishing import write_space

ROOT = Path(__file__).resolve().parents[1]
EPS = 16 / 255
CHROMIUM = os.environ.get("IMPURE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
INSTALL_BROWSER = ("the browser test needs the distribution's Chromium and Playwright's Python package: "
                   "apt-get install -y chromium chromium-driver && pip install playwright "
                   "(no `playwright install`: the test drives /usr/bin/chromium; IMPURE_CHROMIUM=PATH for another)")


@pytest.fixture(scope="module")
def demo() -> AttackDemo:
    return AttackDemo(tiny_model(), lite0())


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """Real photos in awkward forms, and files that are no images."""
    from skimage import data

    folder = tmp_path_factory.mktemp("uploads")
    chelsea = data.chelsea()
    names = ("broken.png", "truncated.jpg", "gray.png", "rgba.png", "huge.jpg", "palette.png")
    files = {name: folder / name for name in names}
    files["broken.png"].write_bytes(b"not an image, only text that ends in .png\n" * 8)
    files["truncated.jpg"].write_bytes(package_file("sklearn/china.jpg").read_bytes()[:3000])
    Image.fromarray(data.camera()).save(files["gray.png"])  # a grayscale photo
    alpha = np.full(chelsea.shape[:2], 128, np.uint8)
    Image.fromarray(np.dstack([chelsea, alpha])).save(files["rgba.png"])
    Image.fromarray(chelsea).resize((6000, 4500), Image.Resampling.BICUBIC).save(files["huge.jpg"], quality=80)
    Image.fromarray(chelsea).convert("P", palette=Image.Palette.ADAPTIVE).save(files["palette.png"])
    return files


# ------------------------------------------------------------------------------ the pipeline
def test_pgd_fools_the_classifier_within_eps_and_the_result_is_reproducible(demo):
    photo = package_file("skimage/chelsea.png")
    passes = []
    result = demo.attack(photo, "pgd", EPS, on_pass=lambda count, expected: passes.append((count, expected)))
    top1 = {name: next(iter(top)) for name, top in result.top_k.items()}
    assert top1["adversarial"] != top1["clean"]
    assert passes[-1] == (10, 10)  # one progress tick per PGD step
    clean, adversarial, perturbation = (
        np.asarray(image, dtype=np.int16) for image in (result.clean, result.adversarial, result.perturbation)
    )
    size = demo.purifier.config.image_size
    assert clean.shape == adversarial.shape == (size, size, 3) and result.purified.size == (size, size)
    delta = np.abs(adversarial - clean).max()
    assert 0 < delta <= 16 and abs(result.linf * 255 - delta) < 1e-3  # on the 8-bit grid, inside eps
    assert np.abs(perturbation - 127.5).max() >= 127  # amplified to the full range around grey
    for top in result.top_k.values():
        probabilities = list(top.values())
        assert len(top) == 5 and probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-5
    assert list(result.seconds) == ["classify clean", "attack (pgd)", "classify adversarial", "purify", "classify purified"]
    again = demo.attack(photo, "pgd", EPS)
    for first, second in ((result.adversarial, again.adversarial), (result.purified, again.purified)):
        assert np.array_equal(np.asarray(first), np.asarray(second))


def test_short_class_names_stay_unique_on_imagenet():
    from impure_hf.classifiers import IMAGENET_LABELS

    names = short_class_names(IMAGENET_LABELS)
    assert len(set(names)) == 1000 and names[0] == "tench" and names[IMAGENET_LABELS.index("tiger cat")] == "tiger cat"
    kept = {name for name in names if ", " in name}  # the lemma two classes share: both keep their full names
    assert kept == {"maillot, tank suit"} and "maillot" in names


def test_purify_tab_pipeline_purifies_without_attacking(demo):
    result = demo.purify_image(package_file("matplotlib/grace_hopper.jpg"))
    size = demo.purifier.config.image_size
    assert result.image.size == result.purified.size == (size, size)
    assert not np.array_equal(np.asarray(result.image), np.asarray(result.purified))
    assert set(result.top_k) == {"image", "purified"}
    assert list(result.seconds) == ["classify image", "purify", "classify purified"]


def test_awkward_images_are_converted_or_resized_with_a_note(bad_files):
    cases = {"gray.png": "mode L: converted to RGB.", "rgba.png": "transparency composited on white",
             "palette.png": "mode P: converted to RGB", "huge.jpg": "6000x4500 pixels: resized to 2048x1536"}
    for name, note in cases.items():
        image, notes = read_image(bad_files[name])
        assert image.mode == "RGB" and max(image.size) <= MAX_SIDE
        assert len(notes) == 1 and note in notes[0] and name in notes[0]
    rgba, _ = read_image(bad_files["rgba.png"])  # half-transparent: composited on white, so brighter
    assert np.asarray(rgba).mean() > np.asarray(Image.open(bad_files["rgba.png"]).convert("RGB")).mean() + 40
    photo, notes = read_image(package_file("skimage/chelsea.png"))
    assert notes == [] and photo.size == (451, 300)


def test_unreadable_files_and_bad_eps_raise_readable_errors(bad_files):
    with pytest.raises(ValueError, match=r"broken\.png is not an image file") as error:
        read_image(bad_files["broken.png"])
    assert str(bad_files["broken.png"].parent) not in str(error.value)  # no server paths on the page
    with pytest.raises(ValueError, match=r"truncated\.jpg could not be decoded"):
        read_image(bad_files["truncated.jpg"])
    assert _parse_eps(" 16/255 ") == pytest.approx(EPS) and _parse_eps("0.03") == 0.03
    for text, message in (("20", r"out of range.*20/255"), ("0", "positive"), ("-4/255", "positive"),
                          ("abc", "fraction like 16/255"), ("1/0", "fraction like 16/255")):
        with pytest.raises(ValueError, match=message):
            _parse_eps(text)


def test_missing_default_model_falls_back_to_the_untrained_preset_with_a_note(monkeypatch, tmp_path):
    import impure_hf.loading

    monkeypatch.setattr(impure_hf.loading, "DEFAULT_MODEL", str(tmp_path / "not-trained-yet"))
    fallback = AttackDemo.load(None, lite0(), device="cpu")
    assert fallback.model_name == FALLBACK_MODEL and "untrained" in fallback.note
    assert fallback.purifier.config.image_size == 224 and not fallback.purifier.training
    with pytest.raises(FileNotFoundError, match="config.json"):  # an explicit model never falls back silently
        AttackDemo.load(str(tmp_path), lite0(), device="cpu")


def test_core_and_cli_work_without_gradio():
    code = (
        "import sys; sys.modules['gradio'] = None\n"  # makes `import gradio` fail
        "from impure_hf.cli import build_parser, main\n"
        "args = build_parser().parse_args(['app', '--model', 'impure-vit-tiny', '--port', '7999'])\n"
        "print(args.model, args.classifier, args.host, args.port)\n"
        "try:\n    main(['app'])\nexcept ImportError as err:\n    print('ImportError:', err)\n"
        "print('gradio imported:', sys.modules['gradio'] is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "impure-vit-tiny efficientnet_lite0 127.0.0.1 7999"
    assert lines[1].startswith("ImportError:") and 'pip install -e ".[app]"' in lines[1]
    assert lines[2] == "gradio imported: False"


# ------------------------------------------------------------------------------ the Space folder
def test_publish_space_dry_run_writes_a_gradio_space(tmp_path):
    pytest.importorskip("gradio", reason='the Space pins the installed Gradio: pip install -e ".[app]"')
    from huggingface_hub import SpaceCard

    out = tmp_path / "space"
    assert cli_main(["publish", "--space", "impure-vit-tiny", "--out", str(out), "--dry-run"]) == 0
    gradio_version = importlib.metadata.version("gradio")
    card = SpaceCard.load(out / "README.md").data
    assert (card.sdk, card.sdk_version, card.app_file, card.license) == ("gradio", gradio_version, "app.py", "apache-2.0")
    requirements = (out / "requirements.txt").read_text().splitlines()
    core = [r for r in importlib.metadata.requires("impure_hf") if "extra ==" not in r]
    assert requirements == [*core, f"gradio=={gradio_version}"]
    app = (out / "app.py").read_text()
    compile(app, "app.py", "exec")
    assert "build_app(model='impure-vit-tiny'" in app and "--no-deps" in app
    package = {p.name for p in (out / "impure_hf").iterdir()}
    assert {"__init__.py", "app.py", "modeling_impure.py"} <= package and "__pycache__" not in package

    saved = tmp_path / "my-purifier"
    tiny_model().save_pretrained(saved)
    write_space(out, model=str(saved))
    assert (out / "model" / "model.safetensors").is_file() and "build_app(model='model'" in (out / "app.py").read_text()
    with pytest.raises(FileNotFoundError, match="config.json"):
        write_space(tmp_path / "other", model=str(tmp_path / "space" / "impure_hf"))


@pytest.mark.slow
def test_space_app_builds_the_page_from_its_own_package_copy(tmp_path):
    pytest.importorskip("gradio", reason='pip install -e ".[app]"')
    out = write_space(tmp_path / "space", model="impure-vit-tiny")
    code = ("import runpy; page = runpy.run_path('app.py')['demo']\n"
            "import impure_hf; print(type(page).__name__, impure_hf.__file__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=out,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr
    kind, package = run.stdout.split()
    assert kind == "Blocks" and Path(package) == out / "impure_hf" / "__init__.py"


# ------------------------------------------------------------------------------ the page in a browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url():
    pytest.importorskip("gradio", reason='the page needs the app extra: pip install -e ".[app]"')
    from impure_hf.app import build_app

    app = build_app(tiny_model(), lite0(), device="cpu")
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip(INSTALL_BROWSER)
    playwright_api = pytest.importorskip("playwright.sync_api", reason=INSTALL_BROWSER)
    with tempfile.TemporaryDirectory() as profile, playwright_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport={"width": 1500, "height": 1000}
        )
        yield context
        context.close()


@pytest.fixture
def page(browser, page_url):
    from playwright.sync_api import expect

    page = browser.new_page()
    page.set_default_timeout(90_000)
    page.goto(page_url)
    expect(page.locator("#attack-run")).to_be_visible()
    yield page
    page.close()


def _upload(page, path: Path, box: str = "#attack-input") -> None:
    page.set_input_files(f"{box} input[type=file]", str(path))
    page.locator(f"{box} img").wait_for()  # uploaded: its preview is shown


def _run(page, eps: str = "16/255") -> None:
    page.locator("#attack-eps textarea").fill(eps)
    page.locator("#attack-run").click()


def _top_class(page, box: str) -> str:
    return page.locator(f"{box} [data-testid='label-output-value']").inner_text().strip()


def _wait_for_results(page) -> None:
    for box in ("#clean-image", "#adversarial-image", "#purified-image"):
        page.locator(f"{box} img").wait_for()
    page.locator("#purified-top [data-testid='label-output-value']").wait_for()


def test_page_attacks_a_packaged_photo_with_pgd_and_purifies_it(page, tmp_path):
    from playwright.sync_api import expect

    expect(page.locator("#attack-name input")).to_have_value("pgd")
    page.locator("#attack-photos button.gallery-item").first.click()  # chelsea.png, a cat
    page.locator("#attack-input img").wait_for()
    _run(page)
    _wait_for_results(page)
    clean, adversarial, purified = (_top_class(page, box) for box in ("#clean-top", "#adversarial-top", "#purified-top"))
    assert "cat" in clean and adversarial != clean and purified
    expect(page.locator("#attack-seconds")).to_contain_text("attack (pgd)")
    expect(page.locator("#perturbation-text")).to_contain_text("16/255")
    page.screenshot(path=tmp_path / "app.png", full_page=True)
    assert Image.open(tmp_path / "app.png").size[0] >= 1500


@pytest.mark.parametrize(
    "upload, eps, message",
    [
        ("broken.png", "16/255", "broken.png is not an image file"),
        ("photo", "20", "out of range"),
        ("photo", "1/0", "fraction like 16/255"),
    ],
)
def test_page_shows_bad_input_errors_and_keeps_serving(page, bad_files, upload, eps, message):
    from playwright.sync_api import expect

    photo = package_file("skimage/coffee.png")
    _upload(page, photo if upload == "photo" else bad_files[upload])
    _run(page, eps)
    expect(page.locator(".toast-body").filter(has_text=message)).to_be_visible()
    _upload(page, photo)  # the same page, the next request runs
    _run(page)
    _wait_for_results(page)
    assert _top_class(page, "#clean-top")


@pytest.mark.parametrize(
    "upload, note",
    [("gray.png", "mode L: converted to RGB"), ("rgba.png", "transparency composited on white"),
     ("huge.jpg", "resized to 2048x1536")],
)
def test_page_converts_and_resizes_uploads_with_a_note(page, bad_files, upload, note):
    from playwright.sync_api import expect

    _upload(page, bad_files[upload])
    _run(page)
    _wait_for_results(page)
    expect(page.locator("#attack-notes")).to_contain_text(note)
    assert page.locator(".toast-body").count() == 0


def test_page_purify_tab_purifies_an_upload(page, bad_files):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Purify an image").click()
    _upload(page, bad_files["rgba.png"], box="#purify-input")
    page.locator("#purify-run").click()
    for box in ("#purify-original-image", "#purify-purified-image"):
        page.locator(f"{box} img").wait_for()
    assert _top_class(page, "#purify-original-top") and _top_class(page, "#purify-purified-top")
    expect(page.locator("#purify-seconds")).to_contain_text("purify")
    expect(page.locator("#purify-notes")).to_contain_text("converted to RGB")
