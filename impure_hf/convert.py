"""Convert the authors' released IMPure checkpoint into an [`ImpureModel`] Hub folder.

The release (github.com/NoWindButRain/IMPure, commit 72f3edc) saves
``torch.save({'model', 'optimizer', 'epoch', 'scaler', 'args'})`` where ``args`` is the
``argparse.Namespace`` of its training script. This module

1. unpickles it safely: ``weights_only=True`` with only ``argparse.Namespace`` and plain numpy
   scalars allowed (their fine-tuning script computes ``args.lr`` with numpy, so real checkpoints
   carry ``numpy.float64``); anything else needs ``trust_checkpoint=True`` (``--trust-checkpoint``);
2. builds the configuration from ``args`` and the tensor shapes (or from a preset), refusing
   args that contradict the tensors; the fused blocks are not recorded and come from
   ``--fusion-layers`` unless the release default (five) fits;
3. maps every release key through the declared table ``RELEASE_KEY_MAP``, rebuilds the fixed
   sin-cos position tables and loads strictly: an unmapped, missing or wrongly shaped key fails
   with its name;
4. checks a forward pass and writes a Hub folder (weights, config, remote code, model card).

Command line: ``impure convert CKPT --out DIR`` (see ``add_arguments``) or
``python conversion/convert_impure_checkpoint.py CKPT --out DIR``.
"""

from __future__ import annotations

import argparse
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from .configuration_impure import PRESETS, ImpureConfig
from .modeling_impure import ImpureModel

RELEASE_REPO = "NoWindButRain/IMPure"
RELEASE_COMMIT = "72f3edc"

# Release key (full match) -> ImpureModel key. The package keeps the release's names, so the table
# is an identity map; it is declared anyway so that every key is accounted for and a renamed or
# unknown key fails by name. ``None`` = a fixed sin-cos table that is rebuilt from the configuration
# rather than read, exactly as the release's own loaders do (they delete these keys before loading).
_BLOCK = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
RELEASE_KEY_MAP: tuple[tuple[str, Optional[str]], ...] = (
    (r"cls_token", "cls_token"),
    (r"pos_embed", None),
    (r"proj_weights", "proj_weights"),
    (r"(sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod)", r"\1"),  # DDPM noise tables
    (r"mask_token", "mask_token"),
    (r"decoder_pos_embed", None),
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (rf"blocks\.(\d+)\.{_BLOCK}", r"blocks.\1.\2.\3"),
    (r"norm\.(weight|bias)", r"norm.\1"),
    (r"proj_layers\.(\d+)\.(weight|bias)", r"proj_layers.\1.\2"),  # multi-level fusion
    (r"decoder_head_embed\.(weight|bias)", r"decoder_head_embed.\1"),  # head token
    (r"decoder_embed\.(weight|bias)", r"decoder_embed.\1"),
    (r"decoder_embed_norm\.(weight|bias)", r"decoder_embed_norm.\1"),
    (rf"decoder_blocks\.(\d+)\.{_BLOCK}", r"decoder_blocks.\1.\2.\3"),
    (r"decoder_norm\.(weight|bias)", r"decoder_norm.\1"),
    (r"decoder_pred\.(weight|bias)", r"decoder_pred.\1"),
    (r"decoder_rb1\.(weight|bias)", r"decoder_rb1.\1"),  # 3x3 refinement conv
)
# Training-only modules (perceptual networks, a distillation model) that the release's own
# save_model strips; they are not part of the purifier and are dropped (and reported).
TRAINING_ONLY_PREFIXES = ("hgds.", "dmodel.")

# (args.img_mask, args.feature_mask) of the release -> (image_mask, feature_mask) of ImpureConfig.
RELEASE_MASKS: dict[tuple[str, str], tuple[str, str]] = {
    ("noise", "noise"): ("noise", "noise"),  # paper Img+Fea noise (released scripts)
    ("mask", "mask"): ("occlude", "none"),  # masked subset replaced by the mask token
    ("none", "none"): ("none", "none"),  # no masking (plumbing check, not a purifier)
    ("noise", "mask"): ("noise", "none"),  # ImgNoise only: noisy-image features, no extra noise
    ("mask", "noise"): ("none", "noise"),  # FeaNoise only: own clean features diffused
}

# Release factory (args.model) -> (encoder heads, decoder heads); heads are not recoverable from
# tensor shapes. Other names need num_heads / decoder_num_heads (--num-heads / --decoder-num-heads).
RELEASE_FACTORIES: dict[str, tuple[int, int]] = {
    "rcmmff_idmae_vit_base_patch16_dec512d8b": (12, 16),
    "rcmmff_idmae_vit_base_patch16": (12, 16),  # alias of dec512d8b in the release
    "rcmmff_idmae_vit_base_patch16_dec384d8b": (12, 12),
}
# The release class's default ``out_indices``. A checkpoint records only how many blocks are fused
# (the number of proj_layers), not which, so this default is used only for five projections;
# any other count needs the list (--fusion-layers / fusion_layers=).
RELEASE_DEFAULT_FUSION_LAYERS = (0, 2, 4, 6, 8)

# ---------------------------------------------------------------------------------- safe loading
def _numpy_scalar_globals() -> list:
    """numpy's scalar reconstructor, ``numpy.dtype`` and the numeric/bool dtype classes; no arrays."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64, np.longdouble, np.complex64, np.complex128)
    return [scalar, np.dtype, *{type(np.dtype(kind)) for kind in kinds}]


def _global_name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _pickled_globals(path: Path) -> list[str]:
    """The globals a checkpoint would import, read without unpickling: torch's scan for zip archives,
    the pickle opcodes for legacy-format and raw pickles. A file that is neither raises ValueError."""
    if zipfile.is_zipfile(path):
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    found: list[str] = []
    with open(path, "rb") as handle:
        try:
            while handle.peek(1):  # legacy-format files hold several pickles, then raw storage bytes
                strings: list[str] = []
                for opcode, arg, _ in pickletools.genops(handle):
                    if opcode.name == "GLOBAL":
                        found.append(arg.replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(".".join(strings[-2:]))
                    elif isinstance(arg, str):
                        strings.append(arg)
        except Exception as err:  # any parse failure means: not a pickle at all
            if found:
                return sorted(set(found))
            raise ValueError(
                f"{path} is not a PyTorch checkpoint (neither a torch.save archive nor a pickle: {type(err).__name__}: {err})"
            ) from err
    return sorted(set(found))


def load_release_checkpoint(path: Union[str, Path], trust_checkpoint: bool = False) -> dict:
    """The release's checkpoint dict, unpickled with ``weights_only=True``.

    Only tensors, ``argparse.Namespace`` and plain numpy scalars are allowed. Any other pickled
    global fails with a message naming it; ``trust_checkpoint=True`` uses ``weights_only=False``
    (arbitrary code execution: only for files from a source you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint")
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False)
    allowed = [argparse.Namespace, *_numpy_scalar_globals()]
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, IndexError, RuntimeError) as err:
        allowed_names = {_global_name(obj) for obj in allowed}
        offending = [g for g in _pickled_globals(path) if g not in allowed_names]
        found = ", ".join(offending) if offending else "an object the safe loader refuses"
        raise ValueError(
            f"{path} pickles {found}, which the safe loader refuses (it allows tensors, argparse.Namespace "
            "and plain numpy scalars only). If you trust the file's source, pass --trust-checkpoint "
            "(trust_checkpoint=True) to unpickle it with weights_only=False."
        ) from err
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not a release checkpoint: expected a dict with a 'model' state dict, got {found}")
    return checkpoint


# ---------------------------------------------------------------------------------- configuration
def _arg(args: argparse.Namespace, name: str):
    if not hasattr(args, name):
        raise ValueError(f"the checkpoint's args have no '{name}'; cannot infer the configuration "
                         "(use a preset or a checkpoint saved by the release's training scripts)")
    return getattr(args, name)


def _shape(state_dict: dict, key: str) -> tuple:
    if key not in state_dict:
        raise ValueError(f"the checkpoint has no key '{key}', needed to infer the configuration")
    return tuple(state_dict[key].shape)


def _count_blocks(state_dict: dict, prefix: str) -> int:
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _fusion_count(state_dict: dict) -> int:
    """Number of fused blocks: proj_layers, cross-checked with the softmax weights (one more entry)."""
    count = _count_blocks(state_dict, "proj_layers")
    if "proj_weights" in state_dict and _shape(state_dict, "proj_weights")[0] != count + 1:
        raise ValueError(f"the checkpoint has {count} fusion projections (proj_layers) but proj_weights has "
                         f"{_shape(state_dict, 'proj_weights')[0]} entries (expected {count + 1})")
    return count


def release_fusion_layers(
    state_dict: dict, fusion_layers: Optional[Sequence[int]], num_blocks: int, source: str = "fusion_layers"
) -> tuple[int, ...]:
    """The encoder blocks fused by a release checkpoint (the release's ``out_indices``).

    ``fusion_layers`` is the user's list (``--fusion-layers``); ``None`` means the release default
    ``(0, 2, 4, 6, 8)``, accepted only when the checkpoint has five projections (or none: no fusion).
    The list must have one entry per ``proj_layers`` in the checkpoint and name existing blocks.
    """
    count = _fusion_count(state_dict)
    if fusion_layers is None:
        if count == 0:
            return ()
        if count != len(RELEASE_DEFAULT_FUSION_LAYERS):
            raise ValueError(
                f"the checkpoint has {count} fusion projections (proj_layers.0..{count - 1}); which encoder "
                f"blocks they fuse is recorded neither in its tensors nor in its args, and the release default "
                f"{RELEASE_DEFAULT_FUSION_LAYERS} has 5: pass the {count} block indices the model was built with "
                f"(its out_indices) as --fusion-layers (fusion_layers= in the API)")
        fusion_layers, source = RELEASE_DEFAULT_FUSION_LAYERS, "the release default fusion layers"
    fusion_layers = tuple(int(i) for i in fusion_layers)
    if len(fusion_layers) != count:
        raise ValueError(f"{source} {list(fusion_layers)} lists {len(fusion_layers)} blocks but the checkpoint has "
                         f"{count} fusion projections (proj_layers); pass --fusion-layers with {count} block indices")
    bad = [i for i in fusion_layers if not 0 <= i < num_blocks]
    if bad:
        raise ValueError(f"{source} {list(fusion_layers)}: {bad} are not encoder blocks of the checkpoint "
                         f"(blocks.0..{num_blocks - 1}); pass --fusion-layers with the model's out_indices")
    return fusion_layers


def _check_args_against_tensors(args: argparse.Namespace, state_dict: dict) -> None:
    """Refuse a checkpoint whose args contradict its own tensors, naming the field."""
    release_masks = (str(args.img_mask), str(args.feature_mask))
    has_tables = "sqrt_alphas_cumprod" in state_dict
    if ("noise" in release_masks) != has_tables:
        raise ValueError(f"args img_mask/feature_mask = {release_masks} but the checkpoint "
                         f"{'has' if has_tables else 'lacks'} the noise tables (sqrt_alphas_cumprod)")
    if bool(_arg(args, "use_conv")) != ("decoder_rb1.weight" in state_dict):
        raise ValueError(f"args.use_conv = {args.use_conv} but the checkpoint "
                         f"{'has' if 'decoder_rb1.weight' in state_dict else 'lacks'} the refinement conv (decoder_rb1)")
    if "decoder_head_embed.weight" in state_dict:  # the head token concatenates the other S - 1 subsets' cls
        width, dim = _shape(state_dict, "decoder_head_embed.weight")[1], _shape(state_dict, "cls_token")[-1]
        if width != (int(_arg(args, "chunks")) - 1) * dim:
            raise ValueError(f"args.chunks = {args.chunks} but decoder_head_embed takes {width} = {width // dim} x "
                             f"{dim} inputs, i.e. {width // dim + 1} subsets")


def _release_sizes(args: argparse.Namespace, state_dict: dict, patch: int) -> tuple[int, int]:
    """(image_size, pos_embed_grid), each from its own source in the release's scripts.

    ``args.input_size`` is passed to the model as ``img_size``, which only sizes the position tables:
    they cover a ``2 * input_size`` px image, so the grid side is ``2 * input_size / patch`` (checked
    against the checkpoint's ``pos_embed``). The images the model sees are the training crops,
    ``args.crop_size`` (one size per training source).
    """
    table_size = int(_arg(args, "input_size"))
    if (2 * table_size) % patch:
        raise ValueError(f"args.input_size {table_size}: the release's position tables cover 2 * input_size = "
                         f"{2 * table_size} px, which is not divisible by the patch size {patch}")
    grid = 2 * table_size // patch
    if "pos_embed" in state_dict and _shape(state_dict, "pos_embed")[1] != 1 + grid * grid:
        rows = _shape(state_dict, "pos_embed")[1]
        raise ValueError(f"args.input_size {table_size} gives a {grid} x {grid} position grid (1 + {grid * grid} "
                         f"rows) but the checkpoint's pos_embed has {rows} rows")
    crops = _arg(args, "crop_size")
    crops = sorted({int(size) for size in (crops if isinstance(crops, (list, tuple)) else [crops])})
    if len(crops) != 1:
        raise ValueError(f"args.crop_size {crops} holds several training sizes, so the checkpoint does not say "
                         "which input size the model is for: convert with --preset (sizes from a preset)")
    image_size = crops[0]
    if image_size % patch or image_size // patch > grid:
        raise ValueError(f"args.crop_size {image_size} must be a multiple of the patch size {patch} and at most "
                         f"the position grid ({grid} patches = {grid * patch} px, from args.input_size {table_size})")
    return image_size, grid


def release_config(
    args: Optional[argparse.Namespace],
    state_dict: dict,
    preset: Optional[str] = None,
    num_heads: Optional[int] = None,
    decoder_num_heads: Optional[int] = None,
    fusion_layers: Optional[Sequence[int]] = None,
) -> ImpureConfig:
    """The [`ImpureConfig`] of a release checkpoint.

    Behaviour (subsets, masking modes, refinement conv) always comes from ``args``: ``chunks``,
    ``img_mask`` / ``feature_mask`` (mapped by ``RELEASE_MASKS``), ``use_conv``; each is checked
    against the tensors. Sizes come from ``preset`` when given, else from the tensor shapes and
    ``args``: ``image_size`` from ``args.crop_size``, the position grid ``2 * args.input_size / patch``
    (the release builds its tables for twice its ``img_size`` argument, which is ``input_size``), the
    heads from ``RELEASE_FACTORIES[args.model]`` or ``num_heads`` / ``decoder_num_heads``. The fused
    blocks are ``fusion_layers`` (see [`release_fusion_layers`]). The evaluation division is the
    uniform one and the eval window follows the release's rule (``eval_window_rounding="ceil"``), as in
    its evaluation script (``data_process/main_advpur.py``).
    """
    if args is None:
        raise ValueError("the checkpoint has no 'args'; cannot tell its masking modes and subsets")
    release_masks = (str(_arg(args, "img_mask")), str(_arg(args, "feature_mask")))
    if release_masks not in RELEASE_MASKS:
        raise ValueError(f"unsupported release masking (img_mask, feature_mask) = {release_masks}; "
                         f"known: {sorted(RELEASE_MASKS)}")
    _check_args_against_tensors(args, state_dict)
    image_mask, feature_mask = RELEASE_MASKS[release_masks]
    behaviour = dict(
        num_subsets=int(_arg(args, "chunks")),
        image_mask=image_mask,
        feature_mask=feature_mask,
        use_conv_refine=bool(_arg(args, "use_conv")),
        train_division="random",
        eval_division="uniform",
        eval_window_rounding="ceil",
    )
    num_blocks = _count_blocks(state_dict, "blocks")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known presets: {sorted(PRESETS)}")
        if fusion_layers is None:  # the preset's own list, checked against the checkpoint like a user's
            fusion_layers = ImpureConfig.from_preset(preset).fusion_layers
            source = f"preset {preset!r} fuses blocks"
        else:
            source = "--fusion-layers (fusion_layers=)"
        fusion = release_fusion_layers(state_dict, fusion_layers, num_blocks, source=source)
        return ImpureConfig.from_preset(preset, fusion_layers=fusion, **behaviour)

    model_name = str(getattr(args, "model", ""))
    if (num_heads is None or decoder_num_heads is None) and model_name not in RELEASE_FACTORIES:
        raise ValueError(
            f"cannot tell the attention heads of release model {model_name!r} (heads are not visible in "
            f"the tensor shapes; known factories: {sorted(RELEASE_FACTORIES)}); pass --num-heads and "
            "--decoder-num-heads"
        )
    factory_heads = RELEASE_FACTORIES.get(model_name, (None, None))
    patch = _shape(state_dict, "patch_embed.proj.weight")[-1]
    image_size, grid = _release_sizes(args, state_dict, patch)
    fusion = release_fusion_layers(state_dict, fusion_layers, num_blocks, source="--fusion-layers (fusion_layers=)")
    return ImpureConfig(
        image_size=image_size,
        patch_size=patch,
        num_channels=_shape(state_dict, "patch_embed.proj.weight")[1],
        hidden_size=_shape(state_dict, "cls_token")[-1],
        num_hidden_layers=num_blocks,
        num_attention_heads=num_heads or factory_heads[0],
        intermediate_size=_shape(state_dict, "blocks.0.mlp.fc1.weight")[0],
        decoder_hidden_size=_shape(state_dict, "decoder_embed.weight")[0],
        decoder_num_hidden_layers=_count_blocks(state_dict, "decoder_blocks"),
        decoder_num_attention_heads=decoder_num_heads or factory_heads[1],
        decoder_intermediate_size=_shape(state_dict, "decoder_blocks.0.mlp.fc1.weight")[0],
        fusion_layers=fusion,
        use_head_token="decoder_head_embed.weight" in state_dict,
        pos_embed_grid=grid,
        **behaviour,
    )


# ---------------------------------------------------------------------------------- key mapping
def map_release_key(key: str) -> tuple[bool, Optional[str]]:
    """(matched, target) for one release key; target None = rebuilt table. Unmatched -> (False, None)."""
    for pattern, target in RELEASE_KEY_MAP:
        match = re.fullmatch(pattern, key)
        if match:
            return True, None if target is None else match.expand(target)
    return False, None


def map_release_state_dict(state_dict: dict, model: ImpureModel) -> tuple[dict, list[str]]:
    """Release state dict -> a complete, shape-checked ImpureModel state dict.

    The fixed position tables are taken from ``model`` (rebuilt from its configuration).
    Returns ``(mapped, dropped)`` where ``dropped`` lists the training-only keys left out.
    Raises ``ValueError`` naming every unmapped, extra, missing or wrongly shaped key.
    """
    expected = model.state_dict()
    mapped, dropped, unmapped, extra, wrong_shape = {}, [], [], [], {}
    for key, tensor in state_dict.items():
        if key.startswith(TRAINING_ONLY_PREFIXES):
            dropped.append(key)
            continue
        matched, target = map_release_key(key)
        if not matched:
            unmapped.append(key)
            continue
        name = target if target is not None else key  # a rebuilt table keeps its name
        if name not in expected:
            extra.append(key)
        elif tuple(tensor.shape) != tuple(expected[name].shape):
            wrong_shape[name] = f"{key} {tuple(tensor.shape)} (model expects {tuple(expected[name].shape)})"
        else:  # a rebuilt table is checked for shape, then taken from the model, as the release does
            mapped[name] = tensor if target is not None else expected[name]
    missing = [k for k in expected if k not in mapped and k not in wrong_shape]
    problems = []
    if unmapped:
        problems.append(f"keys with no entry in RELEASE_KEY_MAP: {unmapped}")
    if extra:
        problems.append(f"keys the model does not have (extra): {extra}")
    if wrong_shape:
        problems.append(f"wrongly shaped keys: {list(wrong_shape.values())}")
    if missing:
        problems.append(f"model keys missing from the checkpoint: {missing}")
    if problems:
        raise ValueError("the checkpoint does not match the model configuration: " + "; ".join(problems)
                         + ". Check --preset / --config-from-args and the heads flags.")
    return mapped, dropped


# ---------------------------------------------------------------------------------- conversion
def check_forward(model: ImpureModel, seed: int = 0) -> float:
    """Run the converted model on a smooth test pattern; return mean |purified - input|.

    Fails if the output is not finite, not in [0, 1] or not reproducible under a fixed generator.
    """
    size = model.config.image_size
    ramp = torch.linspace(0, 1, size)
    image = torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
                         0.5 + 0.4 * torch.sin(6 * ramp).view(1, -1) * torch.cos(4 * ramp).view(-1, 1)])
    image = image.unsqueeze(0).to(next(model.parameters()).device)
    model.eval()
    with torch.no_grad():
        out = model(image, generator=torch.Generator().manual_seed(seed))
        again = model(image, generator=torch.Generator().manual_seed(seed))
    if not torch.isfinite(out.reconstruction).all():
        raise RuntimeError("the converted model produced NaN or inf on a test image")
    if not torch.equal(out.purified_pixel_values, again.purified_pixel_values):
        raise RuntimeError("the converted model is not reproducible under a fixed generator")
    return (out.purified_pixel_values - image).abs().mean().item()


def convert_release_checkpoint(
    checkpoint_path: Union[str, Path],
    preset: Optional[str] = "impure-vit-b-release",
    num_heads: Optional[int] = None,
    decoder_num_heads: Optional[int] = None,
    trust_checkpoint: bool = False,
    fusion_layers: Optional[Sequence[int]] = None,
) -> tuple[ImpureModel, dict[str, Any]]:
    """Load a release checkpoint into an [`ImpureModel`] (eval mode).

    Args:
        checkpoint_path: the release's ``torch.save`` file.
        preset: take the sizes from this preset (default ``impure-vit-b-release``, the released
            ViT-B/16); ``None`` infers them from ``args`` and the tensor shapes (``--config-from-args``).
        num_heads / decoder_num_heads: attention heads when ``args.model`` is not a known factory.
        trust_checkpoint: unpickle with ``weights_only=False`` (only for trusted files).
        fusion_layers: the encoder blocks the checkpoint fuses (the release's ``out_indices``; not
            recorded in the file). ``None`` = the release default ``(0, 2, 4, 6, 8)``, accepted only
            for a checkpoint with five fusion projections.

    Returns:
        ``(model, info)``: info holds ``epoch``, ``args`` (a dict), ``release_masks``, ``dropped_keys``
        and ``forward_check_l1`` for the model card.
    """
    checkpoint = load_release_checkpoint(checkpoint_path, trust_checkpoint=trust_checkpoint)
    state_dict, args = checkpoint["model"], checkpoint.get("args")
    config = release_config(args, state_dict, preset=preset, num_heads=num_heads,
                            decoder_num_heads=decoder_num_heads, fusion_layers=fusion_layers)
    model = ImpureModel(config)
    mapped, dropped = map_release_state_dict(state_dict, model)
    model.load_state_dict(mapped, strict=True)
    model.eval()
    info = {
        "checkpoint": Path(checkpoint_path).name,
        "epoch": checkpoint.get("epoch"),
        "args": {k: v.item() if hasattr(v, "item") else v for k, v in vars(args).items()},
        "release_masks": (args.img_mask, args.feature_mask),
        "dropped_keys": dropped,
        "forward_check_l1": check_forward(model),
        "image_size": config.image_size,
        "pos_grid": config.pos_grid,
        "fusion_layers": list(config.fusion_layers),
    }
    return model, info


def conversion_summary(info: dict[str, Any]) -> str:
    """Markdown paragraph for the model card: where the weights came from and how they were checked."""
    args = info["args"]
    img_mask, feature_mask = info["release_masks"]
    return (
        f"Converted with `impure convert` from the authors' released checkpoint `{info['checkpoint']}` "
        f"([{RELEASE_REPO}](https://github.com/{RELEASE_REPO}) at commit {RELEASE_COMMIT}; "
        f"model `{args.get('model')}`, epoch {info['epoch']}, release masking img_mask={img_mask!r} / "
        f"feature_mask={feature_mask!r}; input size {info['image_size']}, position grid {info['pos_grid']} x "
        f"{info['pos_grid']}, fusion layers {list(info['fusion_layers'])}). Every release key was "
        "mapped by a declared table and loaded strictly; the fixed sin-cos position tables were rebuilt "
        "as the release's own loaders do; a forward pass was checked. The equivalence of this package's "
        "forward with the release's was verified on the authors' code with two tiny configurations, "
        "replaying every random draw (to 1e-5). The release ships no licence file: ask the authors before "
        "redistributing these weights."
    )


# ---------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``impure convert`` (shared with conversion/convert_impure_checkpoint.py)."""
    parser.add_argument("checkpoint", help="the release's torch.save checkpoint (.pth)")
    parser.add_argument("--out", required=True, help="output Hub folder")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--preset", default="impure-vit-b-release", choices=sorted(PRESETS),
                       help="take the model sizes from this preset (default: impure-vit-b-release)")
    sizes.add_argument("--config-from-args", action="store_true",
                       help="infer the sizes from the checkpoint's args and tensor shapes instead of a preset")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="encoder attention heads (needed with --config-from-args when args.model is "
                             f"not one of {sorted(RELEASE_FACTORIES)})")
    parser.add_argument("--decoder-num-heads", type=int, default=None, help="decoder attention heads (idem)")
    parser.add_argument("--fusion-layers", type=int, nargs="+", default=None, metavar="BLOCK",
                        help="encoder blocks the checkpoint fuses (the release's out_indices, e.g. 0 3 5); the file "
                             "records only their count, so this is needed unless it has 5 (default 0 2 4 6 8)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle with weights_only=False: arbitrary code execution, trusted files only")
    parser.add_argument("--repo-id", default=None,
                        help="Hub repo id named in the model card (default: --push-to-hub, else impure-hf/impure-vit-b-release)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")


__all__ = [
    "RELEASE_KEY_MAP",
    "RELEASE_MASKS",
    "RELEASE_FACTORIES",
    "RELEASE_DEFAULT_FUSION_LAYERS",
    "TRAINING_ONLY_PREFIXES",
    "load_release_checkpoint",
    "release_config",
    "release_fusion_layers",
    "map_release_key",
    "map_release_state_dict",
    "convert_release_checkpoint",
    "check_forward",
    "conversion_summary",
    "add_arguments",
]
