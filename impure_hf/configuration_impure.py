"""Configuration of the IMPure purifier (RIAE: Regional Intersection AutoEncoder).

This file travels into Hub folders as remote code: it imports only third-party packages.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DIVISIONS = ("uniform", "random")
_IMAGE_MASKS = ("noise", "occlude", "none")
_FEATURE_MASKS = ("noise", "none")
_WINDOW_ROUNDINGS = ("floor", "ceil")
_RESIDUAL_FILLS = (None, "harmonic")

# Presets by name. "impure-vit-b" is the paper's ViT-B/16 setting (DESIGN.md section 2);
# "impure-vit-b-release" is the authors' released variant: same sizes, but position tables
# built for a 28x28 grid (448 px) of which a 224 px input uses a 14x14 window, placed at eval
# by the release's rule.
PRESETS: dict[str, dict] = {
    "impure-vit-b": {},
    "impure-vit-b-release": {"pos_embed_grid": 28, "eval_window_rounding": "ceil"},
    "impure-vit-tiny": {
        "hidden_size": 192,
        "num_hidden_layers": 12,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "decoder_hidden_size": 128,
        "decoder_num_hidden_layers": 4,
        "decoder_num_attention_heads": 4,
        "decoder_intermediate_size": 512,
    },
}


class ImpureConfig(PreTrainedConfig):
    r"""Configuration of [`ImpureModel`], the IMPure purifier.

    Defaults are the paper's ViT-B/16 setting. Sizes follow transformers' ViT naming; the comments
    give the authors' release names where they differ.

    Args:
        image_size: input side the model is built for (the processor's crop size).
        patch_size: side of a square patch.
        num_subsets: S, the number of disjoint patch subsets (release: ``chunks``).
        train_division / eval_division: ``"random"`` (shuffle patches, split evenly) or
            ``"uniform"`` (S must be a square k*k: subset of patch (r, c) = (r % k) * k + c % k).
        image_mask: how subset k's own information is hidden from its reconstruction:
            ``"noise"`` (ImgNoise: features of a diffused copy of the image), ``"occlude"``
            (a learned mask token; no output patch depends on its own input patch) or ``"none"``.
        feature_mask: ``"noise"`` (FeaNoise: diffuse subset k's decoder features) or ``"none"``.
        image_noise_steps / feature_noise_steps: ``[low, high)`` range of diffusion steps drawn
            in training; ``*_eval_step`` is the fixed step used in eval mode.
        num_diffusion_steps: length of the DDPM linear beta schedule (1e-4 .. 0.02).
        fusion_layers: encoder blocks whose outputs are projected and fused with the last one
            (multi-level feature fusion); empty = no fusion.
        use_head_token: prepend to each reconstruction a token made from the other subsets'
            cls outputs (release: ``decoder_head_embed``).
        use_conv_refine: 3x3 convolution after unpatchify (release: ``use_conv``).
        residual_fill: ``None`` (paper, release) or ``"harmonic"``: the decoder predicts a
            correction added to a non-learned fill of each patch from the one-pixel ring of its
            neighbouring patches (harmonic inpainting, never from the patch itself), so training
            starts at the non-learned control's quality. ``decoder_pred`` starts at zero. Not part
            of the paper; off in every preset.
        own_patch_gate: with ``residual_fill`` and ImgNoise only: a linear head on the decoder
            features gives, per pixel, a coefficient ``g`` (zero at init, unconstrained) and the
            output moves from the fill towards the patch's own diffused copy (rescaled to the
            input's scale): ``fill + correction + g * (copy - fill)``. The patch still enters only
            through the noised copy, as with ImgNoise alone. Not part of the paper; off in every preset.
        pos_embed_grid: side of the fixed sin-cos position table; None = image_size / patch_size.
            A larger grid (28 in the release) gives each input a window of it: random offset in
            training, centred in eval (see ``eval_window_rounding``).
        eval_window_rounding: where the eval window sits when the grid-minus-input gap ``G - h``
            is odd: ``"floor"`` (offset ``(G - h) // 2``, spare cell below/right) or ``"ceil"``
            (offset ``(G - h + 1) // 2``, spare cell above/left: the release's ``delta // 2`` with
            ``delta = G - h + 1``, used by converted release checkpoints). Same for an even gap.
        decoder_chunk_size: number of subsets reconstructed per decoder call (None = chosen per
            device and batch size from a token budget; S = all in one call, 1 = a per-subset loop).
            Every setting gives the same output; it trades speed for memory.
        image_mean / image_std: normalisation applied inside the model; inputs are in [0, 1].
    """

    model_type = "impure-riae"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        decoder_hidden_size: int = 512,
        decoder_num_hidden_layers: int = 8,
        decoder_num_attention_heads: int = 16,
        decoder_intermediate_size: int = 2048,
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        num_subsets: int = 4,
        train_division: str = "random",
        eval_division: str = "uniform",
        image_mask: str = "noise",
        feature_mask: str = "noise",
        image_noise_steps: Sequence[int] = (200, 600),
        image_noise_eval_step: int = 400,
        feature_noise_steps: Sequence[int] = (200, 1000),
        feature_noise_eval_step: int = 600,
        num_diffusion_steps: int = 1000,
        fusion_layers: Sequence[int] = (0, 2, 4, 6, 8),
        use_head_token: bool = True,
        use_conv_refine: bool = True,
        residual_fill: Optional[str] = None,
        own_patch_gate: bool = False,
        pos_embed_grid: Optional[int] = None,
        eval_window_rounding: str = "floor",
        decoder_chunk_size: Optional[int] = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_intermediate_size = decoder_intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.num_subsets = num_subsets
        self.train_division = train_division
        self.eval_division = eval_division
        self.image_mask = image_mask
        self.feature_mask = feature_mask
        self.image_noise_steps = list(image_noise_steps)
        self.image_noise_eval_step = image_noise_eval_step
        self.feature_noise_steps = list(feature_noise_steps)
        self.feature_noise_eval_step = feature_noise_eval_step
        self.num_diffusion_steps = num_diffusion_steps
        self.fusion_layers = list(fusion_layers)
        self.use_head_token = use_head_token
        self.use_conv_refine = use_conv_refine
        self.residual_fill = residual_fill
        self.own_patch_gate = own_patch_gate
        self.pos_embed_grid = pos_embed_grid
        self.eval_window_rounding = eval_window_rounding
        self.decoder_chunk_size = decoder_chunk_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self._validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def grid_size(self) -> int:
        """Patches per side of an ``image_size`` input."""
        return self.image_size // self.patch_size

    @property
    def pos_grid(self) -> int:
        """Side of the position tables."""
        return self.pos_embed_grid if self.pos_embed_grid is not None else self.grid_size

    @property
    def uses_noise(self) -> bool:
        return self.image_mask == "noise" or self.feature_mask == "noise"

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ImpureConfig":
        """Build a named preset (``impure-vit-b``, ``impure-vit-b-release``, ``impure-vit-tiny``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown IMPure preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        def positive(**values):
            for key, value in values.items():
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ValueError(f"{key} must be a positive integer, got {value!r}")

        positive(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            decoder_hidden_size=self.decoder_hidden_size,
            decoder_num_hidden_layers=self.decoder_num_hidden_layers,
            decoder_num_attention_heads=self.decoder_num_attention_heads,
            decoder_intermediate_size=self.decoder_intermediate_size,
            num_subsets=self.num_subsets,
            num_diffusion_steps=self.num_diffusion_steps,
        )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        for width, heads, name in (
            (self.hidden_size, self.num_attention_heads, ""),
            (self.decoder_hidden_size, self.decoder_num_attention_heads, "decoder_"),
        ):
            if width % heads:
                raise ValueError(
                    f"{name}hidden_size {width} is not divisible by {name}num_attention_heads {heads}"
                )
        if self.hidden_size % 4 or self.decoder_hidden_size % 4:
            raise ValueError("hidden sizes must be multiples of 4 for the 2-D sin-cos position embedding")
        if self.num_subsets < 2:
            raise ValueError(f"num_subsets must be at least 2 (got {self.num_subsets}): each subset is rebuilt from the others")
        for key in ("train_division", "eval_division"):
            if getattr(self, key) not in _DIVISIONS:
                raise ValueError(f"{key} must be one of {_DIVISIONS}, got {getattr(self, key)!r}")
        if self.image_mask not in _IMAGE_MASKS:
            raise ValueError(f"image_mask must be one of {_IMAGE_MASKS}, got {self.image_mask!r}")
        if self.feature_mask not in _FEATURE_MASKS:
            raise ValueError(f"feature_mask must be one of {_FEATURE_MASKS}, got {self.feature_mask!r}")
        for key in ("image_noise_steps", "feature_noise_steps"):
            low_high = getattr(self, key)
            if len(low_high) != 2 or not 0 <= low_high[0] < low_high[1] <= self.num_diffusion_steps:
                raise ValueError(
                    f"{key} must be [low, high) with 0 <= low < high <= num_diffusion_steps "
                    f"({self.num_diffusion_steps}), got {low_high!r}"
                )
        for key in ("image_noise_eval_step", "feature_noise_eval_step"):
            if not 0 <= getattr(self, key) < self.num_diffusion_steps:
                raise ValueError(f"{key} must lie in [0, {self.num_diffusion_steps}), got {getattr(self, key)!r}")
        bad = [i for i in self.fusion_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"fusion_layers {bad} are not encoder blocks (0..{self.num_hidden_layers - 1})")
        if "uniform" in (self.train_division, self.eval_division):
            root = math.isqrt(self.num_subsets)
            if root * root != self.num_subsets:
                raise ValueError(
                    f"the uniform division needs a square num_subsets (4, 9, ...), got {self.num_subsets}"
                )
            if self.grid_size % root:
                raise ValueError(
                    f"the uniform division into {self.num_subsets} subsets needs a patch grid divisible "
                    f"by {root}; image_size {self.image_size} / patch_size {self.patch_size} = {self.grid_size}"
                )
        if (self.grid_size**2) % self.num_subsets:
            raise ValueError(
                f"{self.grid_size}x{self.grid_size} patches cannot be split into {self.num_subsets} equal subsets"
            )
        if self.residual_fill not in _RESIDUAL_FILLS:
            raise ValueError(f"residual_fill must be one of {_RESIDUAL_FILLS}, got {self.residual_fill!r}")
        if self.own_patch_gate and (self.residual_fill is None or self.image_mask != "noise"):
            raise ValueError(
                "own_patch_gate needs residual_fill (the fill it moves away from) and image_mask='noise' "
                f"(the diffused copy it moves towards); got residual_fill={self.residual_fill!r}, "
                f"image_mask={self.image_mask!r}"
            )
        if self.pos_embed_grid is not None:
            positive(pos_embed_grid=self.pos_embed_grid)
        if self.eval_window_rounding not in _WINDOW_ROUNDINGS:
            raise ValueError(
                f"eval_window_rounding must be one of {_WINDOW_ROUNDINGS}, got {self.eval_window_rounding!r}"
            )
        if self.decoder_chunk_size is not None:
            positive(decoder_chunk_size=self.decoder_chunk_size)
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError("image_mean and image_std need one value per channel")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std}")


__all__ = ["ImpureConfig", "PRESETS", "IMAGENET_MEAN", "IMAGENET_STD"]
