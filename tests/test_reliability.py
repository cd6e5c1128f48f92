"""Issue #20: nothing lost, nothing silently wrong (loading strictness, atomic writes, train runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from impure_hf._utils import CorruptFileError, atomic_path, atomic_write_json, read_json
from impure_hf.loading import load_purifier


# ---------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = tiny_model(seed=7).eval()
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(folder)
    return folder, model


def _edit_weights(folder: Path, out: Path, drop=(), add=None) -> Path:
    import shutil

    shutil.copytree(folder, out)
    weights = load_file(str(out / "model.safetensors"))
    for key in drop:
        del weights[key]
    weights.update(add or {})
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_missing_weight_is_named(saved, tmp_path):
    folder, model = saved
    broken = _edit_weights(folder, tmp_path / "broken", drop=["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match=r"missing from the checkpoint: blocks\.0\.attn\.qkv\.weight"):
        load_purifier(str(broken))
    # the explicit opt-in loads it; everything but the missing tensor equals the saved model
    loaded = load_purifier(str(broken), allow_missing_weights=True)
    ref, got = model.state_dict(), loaded.state_dict()
    assert not torch.equal(ref["blocks.0.attn.qkv.weight"], got["blocks.0.attn.qkv.weight"])
    assert all(torch.equal(ref[k], got[k]) for k in ref if k != "blocks.0.attn.qkv.weight")


def test_unexpected_weight_is_named(saved, tmp_path):
    folder, _ = saved
    broken = _edit_weights(folder, tmp_path / "extra", add={"blocks.9.extra.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"unknown to the model: blocks\.9\.extra\.weight"):
        load_purifier(str(broken))


def test_intact_folder_loads_exactly(saved):
    folder, model = saved
    loaded = load_purifier(str(folder))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_mistyped_preset_names_the_presets():
    with pytest.raises(ValueError, match=r"impure-vit-b-typo.*impure-vit-tiny"):
        load_purifier("impure-vit-b-typo")


# ---------------------------------------------------------------------------------- atomic writes
def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as temporary:
            temporary.write_text('{"step": 2')  # half written, then the process "dies"
            raise RuntimeError("killed")
    assert read_json(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left behind
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_corrupt_json_is_named(tmp_path):
    path = tmp_path / "cells" / "x.json"
    path.parent.mkdir()
    path.write_text('{"accuracy": 0.')
    with pytest.raises(CorruptFileError, match=str(path)):
        read_json(path)


# ---------------------------------------------------------------------------------- training runs
def _run_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _steps(folder: Path) -> list[int]:
    """global_step of each complete checkpoint, oldest first."""
    import json

    found = sorted((folder / "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))
    return [json.loads((p / "trainer_state.json").read_text())["global_step"] for p in found]


def test_train_refuses_a_previous_run_and_overwrite_replaces_it(tmp_path):
    from test_train import config, pair_dataset

    from impure_hf.cli import main as cli_main
    from impure_hf.train import train

    data = pair_dataset(4)
    settings = dict(max_steps=2, save_steps=1, total_limit=1, eval_split=None)
    train(config(tmp_path, **settings), tiny_model(), data)
    run = tmp_path / "run"
    before = _run_files(run)
    assert _steps(run) == [2]  # total_limit 1: only the newest checkpoint
    with pytest.raises(FileExistsError, match=r"previous run \(checkpoints.*--resume latest.*--overwrite-output-dir"):
        train(config(tmp_path, **settings), tiny_model(seed=1), data)
    assert cli_main(["train", "--output-dir", str(run), "--report-to", "none"]) == 2
    from impure_hf.cli import build_parser
    from impure_hf.training_args import config_from_args

    parsed = build_parser().parse_args(["train", "--output-dir", str(run), "--overwrite-output-dir"])
    assert config_from_args(parsed).overwrite_output_dir is True
    assert _run_files(run) == before  # nothing was touched
    # a stale checkpoint of the old run must not survive beside the new run's
    (run / "checkpoints" / "checkpoint_7").mkdir()
    (run / "checkpoints" / "checkpoint_7" / "trainer_state.json").write_text('{"global_step": 99}')
    train(config(tmp_path, overwrite_output_dir=True, **settings, seed=4), tiny_model(seed=1), data)
    assert _steps(run) == [2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint_1"]  # numbering restarted
    assert _run_files(run)["model.safetensors"] != before["model.safetensors"]


def test_kill_during_checkpoint_save_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """--total-limit 1 and a save cut short: the previous checkpoint survives and resume continues exactly."""
    from accelerate import Accelerator
    from test_train import config, pair_dataset

    from impure_hf.train import train

    data = pair_dataset(4)
    settings = dict(max_steps=2, save_steps=1, total_limit=1, eval_split=None)
    straight = train(config(tmp_path, "straight", **settings), tiny_model(), data)

    original, calls = Accelerator.save_state, []

    def killed_on_second_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        result = original(self, output_dir, **kwargs)  # model and optimizer written ...
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # ... but the trainer state never is
        return result

    monkeypatch.setattr(Accelerator, "save_state", killed_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, "killed", **settings), tiny_model(), data)
    monkeypatch.undo()
    run = tmp_path / "killed"
    assert _steps(run) == [1]  # the old checkpoint was not rotated away before the new one was complete
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == [".checkpoint_1.tmp"]
    resumed = train(config(tmp_path, "killed", resume="latest", **settings), tiny_model(seed=9), data)
    assert _steps(run) == [2]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # the leftover is gone
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------- purify's files
class _Identity(torch.nn.Module):
    """A purifier that returns its input: the outputs then show exactly what the model was fed."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def purify(self, pixel_values, generator=None):
        return pixel_values


def _png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _mixed_folder(root: Path) -> dict[str, str]:
    """Files of every kind users have; returns {relative path: expected outcome}."""
    import numpy as np
    from PIL import Image

    from conftest import real_photos

    root.mkdir()
    photo = Image.fromarray((real_photos(48, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    expected = {}

    def put(name, outcome, write):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        expected[name] = outcome

    put("photo.png", "photo_png_purified.png", lambda p: photo.save(p))  # clashes with photo.jpg
    put("photo.jpg", "photo_jpg_purified.png", lambda p: photo.save(p, quality=95))
    put("sub1/x.png", "sub1/x_purified.png", lambda p: photo.save(p))  # clashes with sub2/x.png but for the folder
    put("sub2/x.png", "sub2/x_purified.png", lambda p: photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(p))
    put("truncated.png", "failed", lambda p: p.write_bytes(_png_bytes(photo)[:300]))
    put("zero.png", "failed", lambda p: p.write_bytes(b""))
    put("text.png", "failed", lambda p: p.write_text("this is not an image\n"))
    put("huge.png", "failed", lambda p: Image.new("L", (100, 100)).save(p))  # over MAX_IMAGE_PIXELS (set by the test)
    ramp = np.tile(np.linspace(0, 1, 48), (48, 1))
    put("grey16.png", "grey16_png_purified.png", lambda p: Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(p))
    put("grey16.tif", "grey16_tif_purified.png", lambda p: Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(p))
    put("float.tiff", "float_purified.png", lambda p: Image.fromarray(ramp.astype(np.float32)).save(p))
    put("cmyk.jpg", "cmyk_purified.png", lambda p: Image.new("CMYK", (48, 48), (255, 0, 0, 0)).save(p, quality=95))
    palette = Image.new("P", (48, 48), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    put("palette.png", "palette_purified.png", lambda p: palette.save(p))
    put("rgba.png", "rgba_purified.png", lambda p: Image.new("RGBA", (48, 48), (255, 0, 0, 0)).save(p))
    # stored 48 wide x 24 high, left black and right white; EXIF orientation 6: displayed turned 90 degrees clockwise
    sideways = Image.new("L", (48, 24), 0)
    sideways.paste(255, (24, 0, 48, 24))
    exif = Image.Exif()
    exif[0x0112] = 6

    put("phone.jpg", "phone_purified.png", lambda p: sideways.save(p, exif=exif, quality=95))
    frames = [Image.new("RGB", (48, 48), c) for c in ((0, 255, 0), (0, 0, 255))]
    put("anim.gif", "anim_purified.png", lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]))
    put("notes.txt", "ignored", lambda p: p.write_text("not an image"))
    return expected


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_purify_folder_of_every_kind(tmp_path, monkeypatch):
    from PIL import Image

    from impure_hf.image_processing_impure import ImpureImageProcessor
    from impure_hf.purify import MARKER, purify_files

    expected = _mixed_folder(tmp_path / "in")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2500)  # 100x100 is over twice this: DecompressionBombError
    out, lines = tmp_path / "out", []
    summary = purify_files([tmp_path / "in"], out, _Identity(), ImpureImageProcessor(crop_size=32), log=lines.append, progress=False)

    written = sorted(str(p.relative_to(out)) for p in summary.written)
    assert written == sorted(v for v in expected.values() if v not in ("failed", "ignored"))
    assert sorted(p.name for p, _ in summary.failed) == ["huge.png", "text.png", "truncated.png", "zero.png"]
    assert [p.name for p in summary.ignored] == ["notes.txt"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == written  # nothing else, no temporaries
    assert len(lines) == 4 and all(line.count("\n") == 0 for line in lines)
    assert any("huge.png" in line and "decompression-bomb" in line for line in lines)
    # every output carries the marker that lets a rerun skip it
    assert all(MARKER in Image.open(p).info for p in summary.written)

    got = {name: _pixels(out / target) for name, target in expected.items() if target not in ("failed", "ignored")}
    for name in ("grey16.png", "grey16.tif", "float.tiff"):  # a 0..1 ramp: mid-grey on average, not white or black
        assert abs(got[name].mean() - 127.5) < 6, name
        assert got[name][:, 0].mean() < 40 and got[name][:, -1].mean() > 215, name
    assert got["cmyk.jpg"].mean(axis=(0, 1)) == pytest.approx([0, 255, 255], abs=12)  # cyan
    assert got["palette.png"].mean(axis=(0, 1)) == pytest.approx([255, 0, 0], abs=1)
    assert got["rgba.png"].min() == 255  # fully transparent: white, not the hidden red or black
    assert got["anim.gif"].mean(axis=(0, 1)) == pytest.approx([0, 255, 0], abs=2)  # the first frame
    phone = got["phone.jpg"]  # turned upright: the black half on top
    assert phone[:12].mean() < 30 and phone[-12:].mean() > 225
    assert abs(phone[:, :12].mean() - phone[:, -12:].mean()) < 10
    assert not (got["sub1/x.png"] == got["sub2/x.png"]).all()  # both kept, each from its own input


def test_purify_never_overwrites_and_skips_its_outputs(tmp_path):
    from PIL import Image

    from impure_hf.image_processing_impure import ImpureImageProcessor
    from impure_hf.purify import purify_files

    from conftest import real_photos

    folder = tmp_path / "photos"
    folder.mkdir()
    photo = Image.fromarray((real_photos(32, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    photo.save(folder / "a.png")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / "a_purified.png")  # the user's own file
    mine = (folder / "a_purified.png").read_bytes()
    processor = ImpureImageProcessor(crop_size=32)

    def run(**kwargs):
        return purify_files([folder], folder, _Identity(), processor, log=lambda line: None, progress=False, **kwargs)

    first = run()
    assert (folder / "a_purified.png").read_bytes() == mine  # not overwritten
    assert [p.name for p in first.kept] == ["a.png"]
    assert [p.name for p in first.written] == ["a_purified_purified.png"]  # the user's file is an input like any other
    second = run()  # --out is the input folder: the earlier output is skipped, not purified again
    assert [p.name for p in second.skipped] == ["a_purified_purified.png"] and not second.written
    assert not (folder / "a_purified_purified_purified.png").exists()
    third = run(overwrite=True)  # replaces the user's file; outputs (now both) are still never inputs
    assert [p.name for p in third.written] == ["a_purified.png"]
    assert sorted(p.name for p in third.skipped) == ["a_purified.png", "a_purified_purified.png"]
    assert (folder / "a_purified.png").read_bytes() != mine


def test_purify_command_exit_codes_and_summary(saved, tmp_path, capsys):
    from PIL import Image

    from impure_hf.cli import main as cli_main

    folder, _ = saved
    images = tmp_path / "in"
    images.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(images / "ok.png")
    assert cli_main(["purify", str(images), "--out", str(tmp_path / "out"), "--model", str(folder)]) == 0
    assert (tmp_path / "out" / "ok_purified.png").is_file()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert cli_main(["purify", str(images), "--out", str(tmp_path / "out"), "--model", str(folder)]) == 1
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "broken.png" in captured.err and "Traceback" not in captured.err
    assert "purified 0 image(s)" in captured.out and "1 kept" in captured.out and "1 failed" in captured.out
    assert cli_main(["purify", str(images), "--out", str(tmp_path / "o2"), "--size", "0"]) == 2
    assert "--size must be a positive integer" in capsys.readouterr().err
    assert cli_main(["purify", str(tmp_path / "nothing"), "--out", str(tmp_path / "o3")]) == 2
    assert "no such image file or folder" in capsys.readouterr().err
    # a checkpoint with a missing tensor: refused with one line naming it, nothing written
    broken = _edit_weights(folder, tmp_path / "broken", drop=["blocks.0.attn.qkv.weight"])
    assert cli_main(["purify", str(images), "--out", str(tmp_path / "o4"), "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "blocks.0.attn.qkv.weight" in err and "Traceback" not in err and not (tmp_path / "o4").exists()


# ---------------------------------------------------------------------------------- image processor
def test_processor_scales_modes_by_range_and_rejects_floats_out_of_range():
    import numpy as np
    from PIL import Image

    from impure_hf.image_processing_impure import ImpureImageProcessor

    processor = ImpureImageProcessor(crop_size=32, do_resize=False)
    ramp = np.tile(np.linspace(0, 1, 32), (32, 1))
    images = {
        "I;16": Image.fromarray((ramp * 65535).round().astype(np.uint16)),
        "I": Image.fromarray((ramp * 65535).round().astype(np.int32)),
        "F": Image.fromarray(ramp.astype(np.float32)),
        "uint16 array": (ramp * 65535).round().astype(np.uint16),
    }
    for name, image in images.items():
        pixels = processor(image)["pixel_values"][0]
        assert image is images["uint16 array"] or image.mode == name
        torch.testing.assert_close(pixels[0], torch.from_numpy(ramp).float(), atol=0.5 / 255 + 1e-6, rtol=0, msg=name)
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\], got values in \[0, 255\] \(0\.\.255 data: divide by 255\)"):
        processor((ramp * 255).astype(np.float32))
    with pytest.raises(ValueError, match=r"\[-0\.5, 1\]"):
        processor(torch.from_numpy(ramp - 0.5 * (ramp == 0)).float().expand(3, -1, -1))


# ---------------------------------------------------------------------------------- corrupt caches
def test_corrupt_evaluation_caches_are_named_and_rebuilt(tmp_path):
    from impure_hf.classifiers import load_classifier
    from impure_hf.evaluation import evaluate, load_eval_images

    settings = dict(
        classifiers=[load_classifier("efficientnet_lite0")], baselines=["identity"], data=load_eval_images(max_images=2),
        attacks=["fgsm"], threat_models=["black-box"], batch_size=2, panels=0, progress=False, out_dir=tmp_path,
    )
    first = evaluate(**settings)
    assert not (tmp_path / "panels").exists()  # panels=0: none
    cell = sorted((tmp_path / "cells").glob("*__fgsm__*.json"))[0]  # recomputing it needs the adversarial batch
    before = read_json(cell)
    adversarial = next((tmp_path / "adversarial").rglob("*.safetensors"))
    cell.write_text(cell.read_text()[:20])  # a half-written cache, as an in-place write killed midway leaves
    adversarial.write_bytes(adversarial.read_bytes()[:100])
    with pytest.warns(UserWarning) as caught:
        again = evaluate(**settings)
    messages = " ".join(str(w.message) for w in caught)
    assert str(cell) in messages and str(adversarial) in messages
    strip = lambda cells: [{k: v for k, v in c.items() if k != "seconds"} for c in cells]  # noqa: E731
    assert strip(again["cells"]) == strip(first["cells"])
    assert {k: v for k, v in read_json(cell).items() if k != "seconds"} == {k: v for k, v in before.items() if k != "seconds"}
    assert load_file(str(adversarial))["adversarial"].shape[0] == 2


def test_resume_latest_skips_a_corrupt_trainer_state(tmp_path):
    from impure_hf.train import _find_checkpoint
    from impure_hf.training_args import TrainingConfig

    for index, text in ((0, '{"global_step": 1}'), (1, '{"global_st')):
        folder = tmp_path / "checkpoints" / f"checkpoint_{index}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(text)
    with pytest.warns(UserWarning, match=r"checkpoint_1/trainer_state\.json is corrupt"):
        found = _find_checkpoint(TrainingConfig(output_dir=str(tmp_path), resume="latest"))
    assert found.name == "checkpoint_0"
    # named explicitly, the corrupt checkpoint is refused with its path
    from test_train import config, pair_dataset

    from impure_hf.train import train

    explicit = config(tmp_path, resume=str(tmp_path / "checkpoints" / "checkpoint_1"), eval_split=None)
    with pytest.raises(CorruptFileError, match=r"checkpoint_1/trainer_state\.json is corrupt.*resume from another"):
        train(explicit, tiny_model(), pair_dataset(2))


def test_make_dataset_rebuilds_a_corrupt_shard_and_names_a_corrupt_config(tmp_path, caplog):
    from impure_hf.data import BUILD_DIR, _prepare_output, _shard_done

    settings = {"seed": 0, "eps": 0.06}
    _prepare_output(tmp_path, settings, overwrite=False)
    assert read_json(tmp_path / BUILD_DIR / "config.json") == settings
    stats = tmp_path / BUILD_DIR / "train-00000.json"
    atomic_write_json(stats, {"rows": 3})
    assert _shard_done(stats)
    stats.write_text('{"rows"')
    assert not _shard_done(stats)  # built again
    assert str(stats) in caplog.text
    (tmp_path / BUILD_DIR / "config.json").write_text('{"seed": 0, "ep')
    with pytest.raises(CorruptFileError, match=r"\.build/config\.json is corrupt.*--overwrite"):
        _prepare_output(tmp_path, settings, overwrite=False)


# ---------------------------------------------------------------------------------- smaller items
def test_convert_names_the_problem_of_pickles_random_bytes_and_empty_files(tmp_path):
    import os
    import pickle

    from impure_hf.convert import load_release_checkpoint

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "EXECUTED"),))

    torch.save({"model": {}, "x": Payload()}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"model": {}, "x": Payload()}))
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.pth").write_bytes(b"")
    for name in ("legacy.pth", "raw.pkl"):
        with pytest.raises(ValueError, match=r"pickles (posix|os)\.system.*--trust-checkpoint"):
            load_release_checkpoint(tmp_path / name)
    with pytest.raises(ValueError, match=r"random\.pth is not a PyTorch checkpoint"):
        load_release_checkpoint(tmp_path / "random.pth")
    with pytest.raises(ValueError, match=r"empty\.pth is empty"):
        load_release_checkpoint(tmp_path / "empty.pth")
    assert not (tmp_path / "EXECUTED").exists()
    # a legacy-format checkpoint of plain tensors still loads
    torch.save({"model": {"w": torch.arange(3.0)}}, tmp_path / "plain.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(load_release_checkpoint(tmp_path / "plain.pth")["model"]["w"], torch.arange(3.0))


def test_model_names_float64_and_empty_batches():
    model = tiny_model().eval()
    with pytest.raises(TypeError, match=r"dtype torch\.float64 but the model torch\.float32.*\.to\(model\.dtype\)"):
        model(torch.rand(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 3, 32, 32\)\)"):
        model(torch.rand(0, 3, 32, 32))


def test_evaluate_refuses_negative_panels():
    from impure_hf.evaluation import evaluate

    with pytest.raises(ValueError, match=r"panels must be a non-negative integer.*-1"):
        evaluate(data=torch.rand(2, 3, 32, 32), panels=-1, baselines=[], progress=False)
