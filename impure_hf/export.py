"""Export the purifier for deployment in front of a classifier: ONNX, checked with onnxruntime.

The purifier draws noise at every call, also in eval mode (ImgNoise / FeaNoise). An exported graph
takes those draws as inputs, so that the deployed purifier can be replayed and checked exactly:

======================  ====================================  =====================================
ONNX input              shape                                 what to feed
======================  ====================================  =====================================
``pixel_values``        (N, C, H, W) float32 in [0, 1]        the images
``image_noise``         (N, C, H, W) float32                  standard normal samples (ImgNoise)
``feature_noise``       (N, H/p * W/p, decoder_hidden_size)   standard normal samples (FeaNoise)
======================  ====================================  =====================================

``image_noise`` / ``feature_noise`` exist only when the configuration uses that masking mode. Fresh
``numpy.random.default_rng().standard_normal(shape, dtype=numpy.float32)`` samples at every call give
the model's own behaviour; fixed samples give a repeatable purifier. Everything else an eval forward
draws is fixed (centred position window, uniform division, noise steps from the configuration).
The batch size N is a dynamic axis of the graph; the image size is fixed at export
(``--image-size``, default the model's).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .loading import load_purifier
from .modeling_impure import ImpureModel, ImpureNoise

_INSTALL_HINT = "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'impure_hf[export]'"


class PurifierWithNoiseInputs(nn.Module):
    """An eval-mode purifier whose random draws are inputs: images (+ noise) -> purified images."""

    def __init__(self, model: ImpureModel):
        super().__init__()
        self.model = model
        self.eval()

    def input_names(self) -> list[str]:
        c = self.model.config
        return ["pixel_values"] + (["image_noise"] if c.image_mask == "noise" else []) + (
            ["feature_noise"] if c.feature_mask == "noise" else []
        )

    def example_inputs(self, batch_size: int, image_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Images in [0, 1] and standard normal noise of the shapes the graph takes."""
        c = self.model.config
        gen = torch.Generator().manual_seed(seed)
        shapes = {
            "pixel_values": (batch_size, c.num_channels, image_size, image_size),
            "image_noise": (batch_size, c.num_channels, image_size, image_size),
            "feature_noise": (batch_size, (image_size // c.patch_size) ** 2, c.decoder_hidden_size),
        }
        return tuple(
            torch.rand(shapes[name], generator=gen) if name == "pixel_values" else torch.randn(shapes[name], generator=gen)
            for name in self.input_names()
        )

    def forward(self, pixel_values: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
        given = dict(zip(self.input_names()[1:], noise))
        draws = ImpureNoise(image_noise=given.get("image_noise"), feature_noise=given.get("feature_noise"))
        return self.model(pixel_values, noise=draws, return_dict=True).purified_pixel_values


def export_onnx(
    model: ImpureModel,
    out: str | os.PathLike,
    image_size: Optional[int] = None,
    check: bool = True,
    atol: float = 1e-4,
    seed: int = 0,
) -> dict:
    """Write ``model`` as an ONNX file with a dynamic batch axis (atomically) and, with ``check``,
    compare onnxruntime's output with eager PyTorch on the same images and noise at batch sizes 1
    and 3 (max abs difference <= ``atol``, else ValueError). Returns a summary: path, inputs,
    max_abs_diff."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs it)
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    # a float32 CPU copy: the caller's model keeps its device, dtype and mode
    wrapper = PurifierWithNoiseInputs(copy.deepcopy(model).float().cpu())
    image_size = image_size or model.config.image_size
    inputs = wrapper.example_inputs(2, image_size, seed)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic_shapes = ({0: batch}, tuple({0: batch} for _ in inputs[1:]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_file = Path(tmp) / out.name
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper, inputs, input_names=wrapper.input_names(), output_names=["purified_pixel_values"],
                dynamic_shapes=dynamic_shapes, dynamo=True, external_data=False, verbose=False,
            )
        program.save(str(tmp_file))
        summary = {"path": str(out), "inputs": wrapper.input_names(), "image_size": image_size}
        if check:  # other batch sizes than the traced one: the batch axis really is dynamic
            summary["max_abs_diff"] = max(
                check_onnx(tmp_file, wrapper, wrapper.example_inputs(n, image_size, seed + n), atol) for n in (1, 3)
            )
        os.replace(tmp_file, out)  # only a checked file reaches its name
    return summary


def check_onnx(path: str | os.PathLike, wrapper: PurifierWithNoiseInputs, inputs: tuple, atol: float = 1e-4) -> float:
    """Max abs difference of onnxruntime's output from eager on ``inputs``; ValueError above ``atol``."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: tensor.numpy() for name, tensor in zip(wrapper.input_names(), inputs)}
    (onnx_out,) = session.run(None, feed)
    with torch.no_grad():
        eager = wrapper(*inputs).numpy()
    diff = float(np.abs(onnx_out - eager).max())
    if not diff <= atol:
        raise ValueError(f"the ONNX model differs from eager PyTorch by {diff:.2e} (> {atol:.0e}) on fixed noise")
    return diff


# ---------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="preset name, saved folder or Hub id")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    parser.add_argument("--out", required=True, help="output file (.onnx)")
    parser.add_argument("--image-size", type=int, default=None, help="image size fixed in the graph (default: the model's)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted onnxruntime-vs-eager difference")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")


def run(args: argparse.Namespace) -> int:
    summary = export_onnx(
        load_purifier(args.model), args.out, image_size=args.image_size,
        check=not args.no_check, atol=args.atol,
    )
    check = f"; onnxruntime matches eager to {summary['max_abs_diff']:.1e}" if "max_abs_diff" in summary else ""
    print(f"wrote {summary['path']} (inputs: {', '.join(summary['inputs'])}){check}")
    return 0


__all__ = ["PurifierWithNoiseInputs", "export_onnx", "check_onnx", "add_arguments", "run"]
