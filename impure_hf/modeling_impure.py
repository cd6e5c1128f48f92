"""IMPure purifier: RIAE (Regional Intersection AutoEncoder) with information masking.

The paper's figure, in code:

    x ──normalise──► patches ──divide into S subsets──► forward_encoder (each subset alone)
                                                            │ clean features z, cls heads
    x_noisy (ImgNoise) ──────────────────────────────────► │ noisy features zn
                                                            ▼
    forward_decoder: for each subset k, the decoder sees every other subset's clean features and,
    at subset k's positions, zn (+ FeaNoise) or a mask token; it predicts subset k's pixels.
    stitch the S predictions ──► forward_output: unpatchify ──► 3x3 conv refinement ──► purified image

``forward`` first resolves every random draw (window, division, noise steps, noise) into one
``ImpureNoise``, then runs ``_purify`` (encode -> decode -> output, like MAE's models_mae.py) over
groups of images sized by one memory-budget helper, ``_chunk_sizes``.

State-dict key names follow the authors' release (DESIGN.md section 3), so their checkpoints
load by name. The helpers and layers live in ``layers_impure``. This file travels into Hub folders
as remote code: it imports only ``configuration_impure`` and ``layers_impure`` (relatively) and
third-party packages.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, fields, replace
from typing import Optional, Union

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_impure import ImpureConfig
from .layers_impure import (  # noqa: F401  (the helpers and layers were defined here before; still importable from here)
    HarmonicPatchFill,
    ImpureAttention,
    ImpureLayer,
    ImpureMLP,
    ImpurePatchEmbed,
    _is_tracing,
    _rand,
    _randint,
    eager_attention_forward,
    noise_schedule,
    sincos_pos_embed,
    sincos_table,
    uniform_division,
)

try:  # transformers >= 5 initialisers skip weights already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x
    init = nn.init


# ---------------------------------------------------------------------------------- outputs
@dataclass
class ImpureOutput(ModelOutput):
    """Output of [`ImpureModel`].

    Args:
        purified_pixel_values: the purified images in [0, 1], shape (N, C, H, W) (clamped).
        reconstruction: the raw prediction in the model's normalised space (not clamped; the
            training losses use it).
        subset_index: (N, h, w) subset of each patch in the division that was used.
        hidden_states: with ``output_hidden_states=True``, the encoder's input tokens and each
            encoder block's output for the clean image (as ViTMAE's ``hidden_states``): a tuple of
            ``num_hidden_layers + 1`` tensors of shape (N * S, 1 + L / S, hidden_size); row
            n * S + k is subset k of image n (token 0 the cls token, then the subset's patches in
            the division's order).
        attentions: with ``output_attentions=True`` and eager attention, each encoder block's
            attention weights, (N * S, heads, 1 + L / S, 1 + L / S), rows as ``hidden_states``
            (other kernels do not form the weights: None entries).
    """

    purified_pixel_values: Optional[torch.FloatTensor] = None
    reconstruction: Optional[torch.FloatTensor] = None
    subset_index: Optional[torch.LongTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[tuple[torch.FloatTensor, ...]] = None


@dataclass
class ImpureNoise:
    """Explicit random draws of one forward, to replay it exactly (like ViTMAE's ``noise``).

    Any field left None is drawn from the generator (the forward first resolves every draw into one
    complete ``ImpureNoise``; fields the configuration does not use stay None). Shapes for N images
    of h x w patches, L = h * w, S subsets, decoder width Dd:

    Args:
        window_offset: (N, 2) long, (row, col) offset of the input's window in the position grid.
        division: (N, L) long permutation of the patch indices: subset k of image n is
            ``division[n, k*L/S:(k+1)*L/S]`` (what the forward's ``division`` argument resolves to).
        image_noise: (N, C, H, W) Gaussian noise added to the normalised image (ImgNoise).
        image_noise_step: (N,) long diffusion step of the image noise.
        feature_noise: (N, L, Dd) Gaussian noise in PATCH order: row q is added to patch q's
            decoder features when its subset is the one being reconstructed (FeaNoise).
        feature_noise_step: (N, S) long diffusion step of each subset's feature noise.
    """

    window_offset: Optional[torch.Tensor] = None
    image_noise: Optional[torch.Tensor] = None
    image_noise_step: Optional[torch.Tensor] = None
    feature_noise: Optional[torch.Tensor] = None
    feature_noise_step: Optional[torch.Tensor] = None
    division: Optional[torch.Tensor] = None

    def select(self, rows: slice) -> "ImpureNoise":
        """The draws of images ``rows`` (every field is indexed by image first)."""
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self) if getattr(self, f.name) is not None})


# ---------------------------------------------------------------------------------- models
class ImpurePreTrainedModel(PreTrainedModel):
    config_class = ImpureConfig
    base_model_prefix = "impure"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ImpureLayer"]
    # attention goes through transformers' interface (ImpureAttention): every kernel it offers
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # MAE / timm ViT: xavier-uniform linear layers, zero biases
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # patch embedding initialised like a linear layer (MAE)
            fan_in_out = module.weight.view(module.weight.shape[0], -1)
            bound = math.sqrt(6.0 / (fan_in_out.shape[0] + fan_in_out.shape[1]))
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ImpureModel):
            init.normal_(module.cls_token, std=std)
            init.normal_(module.mask_token, std=std)
            if module.proj_weights is not None:
                init.ones_(module.proj_weights)
            if module.residual_fill is not None:
                # the correction starts at zero: the untrained model is the non-learned fill
                init.zeros_(module.decoder_pred.weight)
                init.zeros_(module.decoder_pred.bias)
            if module.own_patch_gate is not None:  # and the gate too: still the non-learned fill
                init.zeros_(module.own_patch_gate.weight)
                init.zeros_(module.own_patch_gate.bias)
            # fixed tables: rebuilt, never learned
            init.copy_(module.pos_embed, sincos_table(module.config.hidden_size, module.config.pos_grid))
            init.copy_(
                module.decoder_pos_embed,
                sincos_table(module.config.decoder_hidden_size, module.config.pos_grid),
            )
            # non-persistent buffers are not in checkpoints: rebuilt from the config
            init.copy_(module.image_mean, torch.tensor(module.config.image_mean).view(1, -1, 1, 1))
            init.copy_(module.image_std, torch.tensor(module.config.image_std).view(1, -1, 1, 1))
            if module.config.uses_noise:
                sac, s1m = noise_schedule(module.config.num_diffusion_steps)
                init.copy_(module.sqrt_alphas_cumprod, sac)
                init.copy_(module.sqrt_one_minus_alphas_cumprod, s1m)


class ImpureModel(ImpurePreTrainedModel):
    """The IMPure purifier: [0, 1] images in, purified [0, 1] images out.

    Example:

    ```python
    >>> import torch
    >>> from impure_hf import ImpureModel
    >>> model = ImpureModel.from_preset("impure-vit-tiny").eval()
    >>> out = model(torch.rand(1, 3, 224, 224), generator=torch.Generator().manual_seed(0))
    >>> out.purified_pixel_values.shape
    torch.Size([1, 3, 224, 224])
    ```
    """

    def __init__(self, config: ImpureConfig):
        super().__init__(config)
        c = config
        dim, ddim, grid = c.hidden_size, c.decoder_hidden_size, c.pos_grid
        self.patch_embed = ImpurePatchEmbed(c.patch_size, c.num_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_table(dim, grid))
        self.blocks = nn.ModuleList(
            ImpureLayer(c, dim, c.num_attention_heads, c.intermediate_size) for _ in range(c.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(dim, eps=c.layer_norm_eps)
        if c.fusion_layers:
            self.proj_layers = nn.ModuleList(nn.Linear(dim, dim) for _ in c.fusion_layers)
            self.proj_weights = nn.Parameter(torch.ones(len(c.fusion_layers) + 1, 1, 1, 1))
        else:
            self.proj_layers, self.proj_weights = None, None
        if c.uses_noise:
            sac, s1m = noise_schedule(c.num_diffusion_steps)
            self.register_buffer("sqrt_alphas_cumprod", sac)
            self.register_buffer("sqrt_one_minus_alphas_cumprod", s1m)

        self.decoder_head_embed = (
            nn.Linear((c.num_subsets - 1) * dim, ddim) if c.use_head_token else None
        )
        self.decoder_embed = nn.Linear(dim, ddim)
        self.decoder_embed_norm = nn.LayerNorm(ddim, eps=c.layer_norm_eps)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.register_buffer("decoder_pos_embed", sincos_table(ddim, grid))
        self.decoder_blocks = nn.ModuleList(
            ImpureLayer(c, ddim, c.decoder_num_attention_heads, c.decoder_intermediate_size)
            for _ in range(c.decoder_num_hidden_layers)
        )
        self.decoder_norm = nn.LayerNorm(ddim, eps=c.layer_norm_eps)
        self.decoder_pred = nn.Linear(ddim, c.patch_size**2 * c.num_channels)
        self.decoder_rb1 = (
            nn.Conv2d(c.num_channels, c.num_channels, 3, padding=1) if c.use_conv_refine else None
        )
        # optional non-learned fill under the learned correction (no parameters, nothing to load)
        self.residual_fill = HarmonicPatchFill(c.patch_size) if c.residual_fill == "harmonic" else None
        # optional per-pixel coefficient towards the patch's own diffused copy (see ImpureConfig)
        self.own_patch_gate = nn.Linear(ddim, c.patch_size**2 * c.num_channels) if c.own_patch_gate else None
        self.register_buffer("image_mean", torch.tensor(c.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(c.image_std).view(1, -1, 1, 1), persistent=False)
        # mirrors the blocks' flag: transformers sets it with theirs, callers read it (train.py)
        self.gradient_checkpointing = False
        # a runtime setting, not a config field: the fastest precision depends on the machine that
        # runs the model, not on the weights (impure_hf.precision.set_precision measures it)
        self.autocast_dtype: Optional[torch.dtype] = None
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ImpureModel":
        """An untrained model of a named preset (see ``ImpureConfig.from_preset``)."""
        return cls(ImpureConfig.from_preset(name, **overrides))

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def set_attention_implementation(self, sdpa: bool = True) -> None:
        """Deprecated: use transformers' ``model.set_attn_implementation("sdpa" | "eager" | ...)``."""
        warnings.warn(
            "set_attention_implementation(sdpa=...) is deprecated; use model.set_attn_implementation('sdpa' or 'eager')",
            FutureWarning,
            stacklevel=2,
        )
        self.set_attn_implementation("sdpa" if sdpa else "eager")

    # ------------------------------------------------------------------ input checks
    def _check_input(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        c = self.config
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be a floating-point tensor in [0, 1], got dtype {pixel_values.dtype} "
                "(convert uint8 images with .float() / 255 or use ImpureImageProcessor)"
            )
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have shape (N, C, H, W), got {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] == 0:
            raise ValueError(f"pixel_values is an empty batch (shape {tuple(pixel_values.shape)})")
        if pixel_values.dtype != self.dtype:  # e.g. float64 from numpy: fails deep inside the convolution
            raise TypeError(f"pixel_values has dtype {pixel_values.dtype} but the model {self.dtype}; use .to(model.dtype)")
        if pixel_values.shape[1] != c.num_channels:
            raise ValueError(
                f"expected {c.num_channels} channels, got {pixel_values.shape[1]} (shape {tuple(pixel_values.shape)})"
            )
        height, width = pixel_values.shape[-2:]
        if height % c.patch_size or width % c.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the patch size {c.patch_size}"
            )
        h, w = height // c.patch_size, width // c.patch_size
        if (h * w) % c.num_subsets:
            raise ValueError(
                f"{h}x{w} patches (image {height}x{width}) cannot be split into {c.num_subsets} equal subsets"
            )
        if _is_tracing():
            # the value checks below read the data on the host: a traced graph (torch.compile,
            # torch.export, ONNX) cannot branch on it, so there they are skipped; the shape checks
            # above are static and stay
            return h, w
        # one host sync for all three checks
        finite, lo, hi = torch.stack(
            [torch.isfinite(pixel_values).all().to(pixel_values.dtype), pixel_values.min(), pixel_values.max()]
        ).tolist()
        if not finite:
            raise ValueError("pixel_values contains NaN or inf")
        if lo < -1e-3 or hi > 1 + 1e-3:
            warnings.warn(
                f"pixel_values should lie in [0, 1] (the model normalises internally); got range "
                f"[{lo:.3f}, {hi:.3f}]. Did you pass normalised or 0-255 images?",
                stacklevel=3,
            )
        return h, w

    # ------------------------------------------------------------------ random draws
    def _resolve_draws(
        self, pixel_values: torch.Tensor, h: int, w: int, division, noise: Optional[ImpureNoise], generator
    ) -> ImpureNoise:
        """Every random draw of one forward in one complete ``ImpureNoise``.

        Draws are made in a fixed order (window offset, division, image-noise step, image noise,
        feature-noise step, feature noise) and before any grouping of images, so neither the
        grouping nor the decoder chunking can change them. Given fields are kept.
        """
        c, N, device = self.config, pixel_values.shape[0], pixel_values.device
        if isinstance(noise, torch.Tensor):
            # ViTMAE's convention: (N, L) per-patch noise whose ascending argsort orders the patches
            if division is not None:
                raise ValueError("give the division either as the division argument or as noise, not both")
            division, noise = torch.argsort(noise.to(device), dim=1), None
        noise = noise or ImpureNoise()
        if division is not None and noise.division is not None:
            raise ValueError("give the division either as the division argument or as noise.division, not both")
        L, S = h * w, c.num_subsets
        offset = self._window_offset(noise.window_offset, N, h, w, generator, device)
        ids = self._division(noise.division if noise.division is not None else division, N, h, w, generator, device)
        draws = ImpureNoise(window_offset=offset, division=ids)
        if c.image_mask == "noise":  # ImgNoise: features of a diffused copy of the image stand in
            draws.image_noise_step = self._steps(noise.image_noise_step, c.image_noise_steps, c.image_noise_eval_step, (N,), generator, device)
            draws.image_noise = (
                noise.image_noise if noise.image_noise is not None else _rand(pixel_values.shape, generator, device, normal=True)
            ).to(device=device, dtype=pixel_values.dtype)
        if c.feature_mask == "noise":  # FeaNoise: the stand-in features are diffused once more
            draws.feature_noise_step = self._steps(noise.feature_noise_step, c.feature_noise_steps, c.feature_noise_eval_step, (N, S), generator, device)
            draws.feature_noise = (
                noise.feature_noise if noise.feature_noise is not None else _rand((N, L, c.decoder_hidden_size), generator, device, normal=True)
            ).to(device)
        return draws

    def _division(self, division, batch: int, h: int, w: int, generator, device) -> torch.Tensor:
        """(N, L) permutation: subset k of sample n = ids_shuffle[n, k*Ls:(k+1)*Ls]."""
        L = h * w
        if division is None:
            division = self.config.train_division if self.training else self.config.eval_division
        if isinstance(division, torch.Tensor):
            ids = division.to(device=device, dtype=torch.long)
            if ids.shape != (batch, L):
                raise ValueError(f"an explicit division must have shape (N, L) = ({batch}, {L}), got {tuple(ids.shape)}")
            if not _is_tracing() and not torch.equal(ids.sort(dim=1).values, torch.arange(L, device=device).expand(batch, L)):
                raise ValueError("an explicit division must be a permutation of the patch indices in each row")
            return ids
        if division == "uniform":
            return uniform_division(h, w, self.config.num_subsets, device).expand(batch, L)
        if division == "random":
            return torch.argsort(_rand((batch, L), generator, device), dim=1)
        raise ValueError(f"division must be 'uniform', 'random' or an (N, L) permutation, got {division!r}")

    def _window_offset(self, given: Optional[torch.Tensor], batch: int, h: int, w: int, generator, device) -> torch.Tensor:
        """(N, 2) (row, col) offsets of the h x w input window in the position grid."""
        grid = self.config.pos_grid
        if given is not None:
            return given.to(device=device, dtype=torch.long).view(batch, 2)
        if self.training and grid >= h and grid >= w:
            # release order: column offset drawn first, then row offset
            ox = _randint(0, grid - w + 1, (batch,), generator, device)
            oy = _randint(0, grid - h + 1, (batch,), generator, device)
            return torch.stack([oy, ox], dim=1)
        # eval (or an input larger than the grid): centred; an odd gap's spare cell goes below/right
        # ("floor") or above/left ("ceil": the release's delta // 2 with delta = grid - h + 1)
        up = int(self.config.eval_window_rounding == "ceil")
        oy, ox = (grid - h + up) // 2, (grid - w + up) // 2
        return torch.tensor([oy, ox], device=device).expand(batch, 2)

    def _steps(self, given, low_high, eval_step, shape, generator, device) -> torch.Tensor:
        if given is not None:
            return given.to(device=device, dtype=torch.long).view(shape)
        if self.training:
            return _randint(low_high[0], low_high[1], shape, generator, device)
        return torch.full(shape, eval_step, device=device, dtype=torch.long)

    def _diffuse(self, x: torch.Tensor, step: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """DDPM forward diffusion q(x_t | x_0) = sqrt(a_t) x + sqrt(1 - a_t) eps, ``step`` broadcast
        over the trailing dimensions of ``x``."""
        shape = step.shape + (1,) * (x.dim() - step.dim())
        signal, noise = (table[step].view(shape).to(x.dtype) for table in (self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod))
        return signal * x + noise * eps.to(x)

    def _positions(self, table: torch.Tensor, offset: torch.Tensor, h: int, w: int, given: bool) -> torch.Tensor:
        """(N, L, width) position embeddings of each patch for the given window offsets."""
        grid = self.config.pos_grid
        r = torch.arange(h, device=offset.device).view(1, h, 1) + offset[:, 0].view(-1, 1, 1)
        c = torch.arange(w, device=offset.device).view(1, 1, w) + offset[:, 1].view(-1, 1, 1)
        r, c = r.expand(-1, h, w).reshape(offset.shape[0], -1), c.expand(-1, h, w).reshape(offset.shape[0], -1)
        if given:  # offsets from the caller: inside the table only if the data says so
            inside = not _is_tracing() and bool(offset.min() >= 0) and bool(
                (offset.max(dim=0).values + torch.tensor([h, w], device=offset.device) <= grid).all()
            )
        else:  # drawn offsets always lie inside; the centred one does when the input fits
            inside = grid >= h and grid >= w
        if inside:
            return table[0, 1:][r * grid + c]
        # the window leaves the table (or cannot be checked while tracing): the sin-cos formula
        # gives every cell, and the table's own cells equally
        return sincos_pos_embed(table.shape[-1], r, c).to(table)

    # ------------------------------------------------------------------ memory budgeting
    # Activation elements (images x patches x width) per encoder/decoder pass when no gradients are
    # taken: larger batches go through in groups of images. On CPU, groups of 4 ViT-B images were
    # 9 % faster than one pass over 16 and bound the activations (a single pass over 64 ViT-B images
    # held 2.2 GB); measured in benchmarks/. The output is the same: every random draw is made first.
    INFERENCE_ACTIVATION_BUDGET = {"cpu": 4 * 196 * 768, "cuda": 1 << 40}
    # decoder tokens per call above which the subsets are decoded in chunks (measured in benchmarks/:
    # on CPU, one call over all N*S rows is no faster than a loop at large batch and holds S times
    # the activations; on a GPU, small batches gain from one call)
    DECODER_TOKEN_BUDGET = {"cpu": 16384, "cuda": 262144}

    def _chunk_sizes(self, batch: int, tokens: int, device: torch.device) -> tuple[int, int]:
        """(images per pass, subsets per decoder call) within the device's memory budgets.

        With gradients every image goes in one pass (autograd keeps the activations anyway).
        ``config.decoder_chunk_size`` overrides the subsets per call. Any choice gives the same output.
        """
        c = self.config
        if _is_tracing():  # a traced graph keeps the batch size symbolic: one pass, no Python arithmetic on it
            return batch, c.decoder_chunk_size or c.num_subsets
        budget = self.INFERENCE_ACTIVATION_BUDGET.get(device.type, self.INFERENCE_ACTIVATION_BUDGET["cpu"])
        images = batch if torch.is_grad_enabled() else max(1, min(batch, budget // (tokens * c.hidden_size)))
        budget = self.DECODER_TOKEN_BUDGET.get(device.type, self.DECODER_TOKEN_BUDGET["cpu"])
        subsets = c.decoder_chunk_size or max(1, min(c.num_subsets, budget // (images * (tokens + 1))))
        return images, subsets

    # ------------------------------------------------------------------ the three stages
    def forward_encoder(
        self,
        normalized: torch.Tensor,
        ids_shuffle: torch.Tensor,
        pos: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[tuple], Optional[tuple]]:
        """Encode each subset on its own.

        Returns patch features (N, L, D) in PATCH order, the cls outputs (N, S, D) and, if asked,
        the hidden states (input tokens and each block's output, rows n*S + k) and each block's
        attention weights.
        """
        S = self.config.num_subsets
        tokens = self.patch_embed(normalized) + pos
        N, L, D = tokens.shape
        # gather each subset's tokens: row n*S + k of the batch is subset k of sample n
        subsets = torch.gather(tokens, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, D)).reshape(N * S, L // S, D)
        x = torch.cat([self.cls_token.expand(N * S, -1, -1), subsets], dim=1)
        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        # the attention weights are the attention module's second output: recorded by forward hooks
        # (as transformers' capture_outputs does), so a block returns one tensor
        hooks = [
            block.attn.register_forward_hook(lambda module, args, output: attentions.append(output[1]))
            for block in self.blocks
        ] if output_attentions else []
        fusion, kept = self.config.fusion_layers, []
        try:
            for i, block in enumerate(self.blocks):
                x = block(x)
                if i in fusion:
                    kept.append(x)
                if output_hidden_states:
                    hidden_states.append(x)
        finally:
            for hook in hooks:
                hook.remove()
        if self.proj_layers is not None:
            # multi-level fusion: softmax-weighted sum of projected block outputs and the last output
            levels = [proj(level) for proj, level in zip(self.proj_layers, kept)] + [x]
            weights = self.proj_weights.softmax(dim=0)
            x = (torch.stack(levels) * weights).sum(dim=0)
        x = self.norm(x)
        heads = x[:, 0].reshape(N, S, D)
        shuffled = x[:, 1:].reshape(N, L, D)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        latent = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
        return (
            latent,
            heads,
            None if hidden_states is None else tuple(hidden_states),
            None if attentions is None else tuple(attentions),
        )

    def forward_decoder(
        self,
        latent: torch.Tensor,
        heads: torch.Tensor,
        fill: torch.Tensor,
        subset_of_patch: torch.Tensor,
        pos: torch.Tensor,
        subsets_per_call: Optional[int] = None,
    ) -> torch.Tensor:
        """Reconstruct each subset from the others and stitch: (N, L, Dd) decoder features.

        ``latent`` (N, L, Dd) are the clean decoder features, ``fill`` (N, L, Dd) what replaces a
        subset's own features while it is reconstructed, both in patch order. ``subsets_per_call``
        subsets are decoded per decoder call (default: all).
        """
        S = self.config.num_subsets
        N, L, Dd = latent.shape
        chunk = subsets_per_call or S
        head_tokens = self._head_tokens(heads) if self.decoder_head_embed is not None else None
        out = torch.zeros_like(latent)
        for start in range(0, S, chunk):
            ks = torch.arange(start, min(start + chunk, S), device=latent.device)
            masked = subset_of_patch.unsqueeze(0) == ks.view(-1, 1, 1)  # (s, N, L)
            x = torch.where(masked.unsqueeze(-1), fill.unsqueeze(0), latent.unsqueeze(0)) + pos
            x = x.reshape(len(ks) * N, L, Dd)  # row (k - start) * N + n
            if head_tokens is not None:
                x = torch.cat([head_tokens[ks].reshape(len(ks) * N, 1, Dd), x], dim=1)
            for block in self.decoder_blocks:
                x = block(x)
            x = self.decoder_norm(x[:, -L:]).reshape(len(ks), N, L, Dd)
            # stitch: each patch keeps the reconstruction in which its own subset was hidden
            out = out + torch.where(masked.unsqueeze(-1), x, 0).sum(dim=0)
        return out

    def _head_tokens(self, heads: torch.Tensor) -> torch.Tensor:
        """(S, N, 1, Dd): for subset k, the cls outputs of the other subsets (ascending) -> Linear."""
        S = self.config.num_subsets
        N, _, D = heads.shape
        # others[k] = the S - 1 subsets other than k, ascending (built on the device: no host copy)
        j, k = torch.arange(S - 1, device=heads.device), torch.arange(S, device=heads.device)
        others = j.view(1, -1) + (j.view(1, -1) >= k.view(-1, 1)).long()
        concat = heads[:, others].reshape(N, S, (S - 1) * D).transpose(0, 1)  # (S, N, (S-1)*D)
        # decoder position row 0 is zero: the head token carries no position
        head = self.decoder_head_embed(concat)
        return (head + self.decoder_pos_embed[0, 0].to(head.dtype)).unsqueeze(2)

    def forward_output(self, decoded: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Decoder features (N, L, Dd) -> pixels (N, C, H, W) in the normalised space: prediction
        head, unpatchify, 3x3 conv refinement."""
        reconstruction = self.unpatchify(self.decoder_pred(decoded), h, w)
        return reconstruction if self.decoder_rb1 is None else self.decoder_rb1(reconstruction)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(N, L, p*p*C) channel-last patches -> (N, C, h*p, w*p)."""
        p, C = self.config.patch_size, self.config.num_channels
        x = tokens.reshape(tokens.shape[0], h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], C, h * p, w * p)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), the inverse of ``unpatchify``."""
        p, C = self.config.patch_size, self.config.num_channels
        N, _, H, W = images.shape
        x = images.reshape(N, C, H // p, p, W // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(N, (H // p) * (W // p), p * p * C)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        division: Union[str, torch.Tensor, None] = None,
        noise: Union[ImpureNoise, torch.Tensor, None] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[ImpureOutput, tuple]:
        r"""Purify ``pixel_values`` (N, C, H, W) in [0, 1].

        Args:
            generator: source of every random draw (window offset, division, noise steps, noise).
                A fixed generator gives identical output.
            division: ``"uniform"``, ``"random"`` or an explicit (N, L) permutation of patch
                indices (subset k = entries k*L/S .. (k+1)*L/S - 1). Default: the config's
                ``train_division`` in training, ``eval_division`` in eval mode.
            noise: an [`ImpureNoise`] with explicit draws, to replay a recorded forward. A plain
                (N, L) tensor is read as ViTMAE's ``noise``: its argsort is the division.
            output_hidden_states: return the encoder's hidden states (see [`ImpureOutput`]).
            output_attentions: return the encoder's attention weights (eager attention only).

        Under ``torch.compile`` / ``torch.export`` the random draws are ops of the graph (drawn
        from the global RNG when no generator is given); pass them as ``noise`` to replay a
        forward exactly (an exported graph then takes them as inputs, see ``impure_hf.export``).
        """
        c = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else c.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else c.output_attentions
        return_dict = return_dict if return_dict is not None else c.return_dict
        h, w = self._check_input(pixel_values)
        resolve = self._resolve_draws
        if generator is not None and torch.compiler.is_compiling():
            # torch.compile cannot hand a torch.Generator to a random op: with one, the draws run
            # eagerly (a single graph break); without one they are ops of the graph (fullgraph works)
            resolve = torch.compiler.disable(self._resolve_draws)
        draws = resolve(pixel_values, h, w, division, noise, generator)
        N, L, S = pixel_values.shape[0], h * w, c.num_subsets
        subset_of_patch = torch.argsort(draws.division, dim=1) // (L // S)  # (N, L)
        given_offset = isinstance(noise, ImpureNoise) and noise.window_offset is not None
        # the fixed tables may be stored in float32 under a model cast to half precision
        pos = self._positions(self.pos_embed, draws.window_offset, h, w, given_offset).to(self.dtype)
        dpos = self._positions(self.decoder_pos_embed, draws.window_offset, h, w, given_offset).to(self.dtype)
        normalized = (pixel_values - self.image_mean) / self.image_std

        with self._autocast(pixel_values.device):
            reconstruction, hidden_states, attentions = self._purify_in_groups(
                normalized, draws, subset_of_patch, pos, dpos, h, w, output_hidden_states, output_attentions
            )
        reconstruction = reconstruction.to(normalized.dtype)  # a bf16 autocast's output back to the input's dtype
        output = ImpureOutput(
            purified_pixel_values=(reconstruction * self.image_std + self.image_mean).clamp(0, 1),
            reconstruction=reconstruction,
            subset_index=subset_of_patch.view(N, h, w),
            hidden_states=hidden_states,
            attentions=attentions,
        )
        return output if return_dict else output.to_tuple()

    def _autocast(self, device: torch.device):
        """torch.autocast in ``autocast_dtype`` when set (e.g. bf16 where it is measured faster), else nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def _purify_in_groups(self, normalized, draws, subset_of_patch, pos, dpos, h, w, output_hidden_states, output_attentions):
        """``_purify`` over groups of images sized by ``_chunk_sizes`` (without gradients, groups
        bound the activations; the output is the same, every draw being made), results joined."""
        N, L = normalized.shape[0], h * w
        images_per_pass, subsets_per_call = self._chunk_sizes(N, L, normalized.device)
        if images_per_pass is N or images_per_pass >= N:  # one pass (`is`: a symbolic batch while tracing)
            return self._purify(normalized, draws, subset_of_patch, pos, dpos, h, w, subsets_per_call,
                                output_hidden_states, output_attentions)
        groups = []
        for i in range(0, N, images_per_pass):
            rows = slice(i, i + images_per_pass)
            groups.append(self._purify(
                normalized[rows], draws.select(rows), subset_of_patch[rows], pos[rows], dpos[rows],
                h, w, subsets_per_call, output_hidden_states, output_attentions,
            ))
        reconstruction, hidden_states, attentions = zip(*groups)
        join = lambda layers: tuple(None if layer[0] is None else torch.cat(layer) for layer in zip(*layers))  # noqa: E731
        return (
            torch.cat(reconstruction),
            join(hidden_states) if output_hidden_states else None,
            join(attentions) if output_attentions else None,
        )

    def _purify(
        self, normalized, draws: ImpureNoise, subset_of_patch, pos, dpos, h, w, subsets_per_call,
        output_hidden_states=False, output_attentions=False,
    ):
        """The paper's figure for a group of images whose draws are made: encode -> decode -> output."""
        c, N = self.config, normalized.shape[0]
        # encode each subset alone; with ImgNoise the diffused copy shares the batched encoder call
        images = normalized
        if draws.image_noise is not None:
            images = torch.cat([normalized, self._diffuse(normalized, draws.image_noise_step, draws.image_noise)])
        copies = images.shape[0] // N
        latent, heads, hidden_states, attentions = self.forward_encoder(
            images, draws.division.repeat(copies, 1), pos.repeat(copies, 1, 1), output_hidden_states, output_attentions
        )
        features = self.decoder_embed_norm(self.decoder_embed(latent))
        clean, heads = features[:N], heads[:N]  # the head tokens come from the clean pass
        if draws.image_noise is not None:
            fill = features[N:]
        elif c.image_mask == "occlude":
            fill = self.mask_token.expand(N, clean.shape[1], -1)
        else:
            fill = clean
        if draws.feature_noise is not None:
            # each patch's features are diffused with the step of its own subset
            fill = self._diffuse(fill, torch.gather(draws.feature_noise_step, 1, subset_of_patch), draws.feature_noise)
        # decode each subset from the others, then pixels
        decoded = self.forward_decoder(clean, heads, fill, subset_of_patch, dpos, subsets_per_call)
        if copies > 1:  # keep the clean image's rows
            rows = N * c.num_subsets
            if hidden_states is not None:
                hidden_states = tuple(state[:rows] for state in hidden_states)
            if attentions is not None:
                attentions = tuple(None if a is None else a[:rows] for a in attentions)
        reconstruction = self.forward_output(decoded, h, w)
        if self.residual_fill is not None:
            # the correction goes on top of a fill from each patch's neighbours (never the patch)
            fill = self.residual_fill(normalized)
            reconstruction = reconstruction + fill
            if self.own_patch_gate is not None:  # per pixel, towards the own noised copy (at the input's scale)
                signal = self.sqrt_alphas_cumprod[draws.image_noise_step].view(-1, 1, 1, 1).to(images.dtype)
                reconstruction = reconstruction + self.unpatchify(self.own_patch_gate(decoded), h, w) * (images[N:] / signal - fill)
        return reconstruction, hidden_states, attentions

    @torch.no_grad()
    def purify(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None, **kwargs) -> torch.Tensor:
        """Purified images in [0, 1] (no gradients); convenience for inference."""
        return self(pixel_values, generator=generator, return_dict=True, **kwargs).purified_pixel_values


__all__ = ["ImpureModel", "ImpurePreTrainedModel", "ImpureOutput", "ImpureNoise"]
