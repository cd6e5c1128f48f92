"""ImpureImageProcessor: input kinds, sizes, [0, 1] range, save / load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from impure_hf import ImpureImageProcessor


@pytest.fixture
def astronaut() -> np.ndarray:
    return data.astronaut()  # (512, 512, 3) uint8, a real photo


def test_pil_numpy_torch_agree(astronaut):
    processor = ImpureImageProcessor(crop_size=64)
    from_pil = processor(Image.fromarray(astronaut))["pixel_values"]
    from_hwc = processor(astronaut)["pixel_values"]
    from_chw = processor(np.moveaxis(astronaut, -1, 0))["pixel_values"]
    from_float = processor(torch.from_numpy(astronaut).permute(2, 0, 1).float() / 255)["pixel_values"]
    assert from_pil.shape == (1, 3, 64, 64) and from_pil.dtype == torch.float32
    assert 0 <= from_pil.min() and from_pil.max() <= 1
    for other in (from_hwc, from_chw, from_float):
        torch.testing.assert_close(other, from_pil, rtol=0, atol=0)


def test_non_square_is_resized_then_centre_cropped():
    photo = data.coffee()  # 400 x 600
    out = ImpureImageProcessor(crop_size=224)(photo)["pixel_values"]  # the one rule: shortest edge = crop side
    assert out.shape == (1, 3, 224, 224)
    resized = Image.fromarray(photo).resize((336, 224), Image.BICUBIC)
    expected = np.asarray(resized.crop((56, 0, 280, 224)), dtype=np.float32) / 255
    torch.testing.assert_close(out[0], torch.from_numpy(expected).permute(2, 0, 1))
    # transformers-style sizes: the ImageNet 0.875 centre crop
    out = ImpureImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 256})(photo)["pixel_values"]
    resized = Image.fromarray(photo).resize((384, 256), Image.BICUBIC)
    expected = np.asarray(resized.crop((80, 16, 304, 240)), dtype=np.float32) / 255
    torch.testing.assert_close(out[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_grayscale_and_rgba_become_rgb():
    gray = data.camera()  # (512, 512) uint8
    out = ImpureImageProcessor(crop_size=32)(gray)["pixel_values"]
    assert out.shape == (1, 3, 32, 32) and torch.equal(out[0, 0], out[0, 1])
    rgba = Image.fromarray(data.astronaut()).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited on white
    out = ImpureImageProcessor(crop_size=32)(rgba)["pixel_values"]
    assert torch.all(out == 1)


def test_batch_and_post_process_round_trip(astronaut):
    processor = ImpureImageProcessor(crop_size=48)
    batch = processor([astronaut, data.chelsea()])["pixel_values"]
    assert batch.shape == (2, 3, 48, 48)
    images = processor.post_process(batch)
    assert [im.size for im in images] == [(48, 48)] * 2
    again = processor(images, )["pixel_values"] if False else torch.stack(
        [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images]
    )
    assert (again - batch).abs().max() <= 0.5 / 255 + 1e-6


def test_save_load(tmp_path):
    ImpureImageProcessor(crop_size=96, size={"shortest_edge": 100}).save_pretrained(tmp_path)
    loaded = ImpureImageProcessor.from_pretrained(tmp_path)
    assert (loaded.crop_size, loaded.size) == ({"height": 96, "width": 96}, {"shortest_edge": 100})
    # a config saved before the transformers-style keys (int crop_size, resize_shortest_edge) still loads
    old = ImpureImageProcessor.from_dict({"crop_size": 96, "resize_shortest_edge": 100})
    assert (old.crop_size, old.size) == (loaded.crop_size, loaded.size)


def test_bad_inputs():
    processor = ImpureImageProcessor(crop_size=32)
    with pytest.raises(ValueError, match="NaN"):
        processor(np.full((40, 40, 3), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        processor(np.zeros((40, 40, 5), dtype=np.uint8))
    with pytest.raises(TypeError, match="PIL image, numpy array or torch tensor"):
        processor(["not an image"])
    with pytest.raises(ValueError, match="crop_size"):
        ImpureImageProcessor(crop_size=0)
    with pytest.raises(ValueError, match="square"):
        ImpureImageProcessor(crop_size={"height": 32, "width": 48})
    with pytest.raises(ValueError, match="size"):
        ImpureImageProcessor(crop_size=32, size={"shortest_edge": -1})
