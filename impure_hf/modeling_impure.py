"""IMPure purifier: RIAE (Regional Intersection AutoEncoder) with information masking.

The paper's figure, in code:

    x ──normalise──► patches ──divide into S subsets──► forward_encoder (each subset alone)
                                                            │ clean features z, cls heads
    x_noisy (ImgNoise) ──────────────────────────────────► │ noisy features zn
                                                            ▼
    forward_decoder: for each subset k, the decoder sees every other subset's clean features and,
    at subset k's positions, zn (+ FeaNoise) or a mask token; it predicts subset k's pixels.
    stitch the S predictions ──► unpatchify ──► 3x3 conv refinement ──► purified image

State-dict key names follow the authors' release (DESIGN.md section 3), so their checkpoints
load by name. This file travels into Hub folders as remote code: it imports only
``configuration_impure`` (relatively) and third-party packages.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_impure import ImpureConfig

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
    """

    purified_pixel_values: Optional[torch.FloatTensor] = None
    reconstruction: Optional[torch.FloatTensor] = None
    subset_index: Optional[torch.LongTensor] = None


@dataclass
class ImpureNoise:
    """Explicit random draws of one forward, to replay it exactly (like ViTMAE's ``noise``).

    Any field left None is drawn from the generator. Shapes for N images of h x w patches,
    L = h * w, S subsets, decoder width Dd:

    Args:
        window_offset: (N, 2) long, (row, col) offset of the input's window in the position grid.
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


# ---------------------------------------------------------------------------------- helpers
def sincos_pos_embed(width: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """MAE 2-D sin-cos embedding of grid cells: first half encodes the column, second the row.

    ``rows`` and ``cols`` are integer tensors of the same shape; returns (..., width) float32.
    Computed in float64 so that tables built once and windows computed on the fly agree.
    """
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    omega = omega.to(rows.device)

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.to(torch.float64).unsqueeze(-1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=-1).to(torch.float32)


def sincos_table(width: int, grid: int) -> torch.Tensor:
    """(1, 1 + grid*grid, width) table: row 0 (cls) is zeros, row 1 + gy*grid + gx is cell (gy, gx)."""
    gy, gx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = sincos_pos_embed(width, gy.reshape(-1), gx.reshape(-1))
    return torch.cat([torch.zeros(1, width), table]).unsqueeze(0)


def noise_schedule(num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar) and sqrt(1 - alpha_bar) of the DDPM linear schedule (betas 1e-4 .. 0.02)."""
    betas = torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return alphas_cumprod.sqrt().float(), (1.0 - alphas_cumprod).sqrt().float()


def uniform_division(h: int, w: int, num_subsets: int, device=None) -> torch.Tensor:
    """(L,) permutation listing subset 0's patches, then subset 1's, ...; ascending inside each.

    For S = k*k, patch (r, c) is in subset (r % k) * k + c % k: each subset is a stride-k
    lattice, so every patch's neighbours belong to other subsets. Deterministic (stable sort),
    unlike the release's unstable argsort whose tie order varies by device.
    """
    k = math.isqrt(num_subsets)
    if k * k != num_subsets:
        raise ValueError(f"the uniform division needs a square num_subsets (4, 9, ...), got {num_subsets}")
    if h % k or w % k:
        raise ValueError(
            f"the uniform division into {num_subsets} subsets needs a patch grid divisible by {k}, "
            f"got {h}x{w} patches"
        )
    r = torch.arange(h, device=device).view(h, 1)
    c = torch.arange(w, device=device).view(1, w)
    subset = ((r % k) * k + c % k).reshape(-1)
    return torch.sort(subset, stable=True).indices


def _rand(shape, generator, device, dtype=torch.float32, normal=False):
    """Draw on the generator's device (or ``device`` for the global generator), then move."""
    gen_device = generator.device if generator is not None else device
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def _randint(low, high, shape, generator, device):
    gen_device = generator.device if generator is not None else device
    return torch.randint(low, high, shape, generator=generator, device=gen_device).to(device)


# ---------------------------------------------------------------------------------- layers
class ImpureAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm key names: qkv, proj)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_sdpa = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.use_sdpa:
            x = F.scaled_dot_product_attention(q, k, v)
        else:  # eager reference, for benchmarks and debugging
            x = (q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class ImpureMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as timm and the release
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ImpureLayer(nn.Module):
    """Pre-norm transformer block; parameter names match timm's ``Block``."""

    def __init__(self, dim: int, num_heads: int, hidden: int, eps: float, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = ImpureAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ImpureMLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImpurePatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, row-major (token r*w + c is patch (r, c))."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------- models
class ImpurePreTrainedModel(PreTrainedModel):
    config_class = ImpureConfig
    base_model_prefix = "impure"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ImpureLayer"]
    _supports_sdpa = True

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
            ImpureLayer(dim, c.num_attention_heads, c.intermediate_size, c.layer_norm_eps, c.qkv_bias)
            for _ in range(c.num_hidden_layers)
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
            ImpureLayer(ddim, c.decoder_num_attention_heads, c.decoder_intermediate_size, c.layer_norm_eps, c.qkv_bias)
            for _ in range(c.decoder_num_hidden_layers)
        )
        self.decoder_norm = nn.LayerNorm(ddim, eps=c.layer_norm_eps)
        self.decoder_pred = nn.Linear(ddim, c.patch_size**2 * c.num_channels)
        self.decoder_rb1 = (
            nn.Conv2d(c.num_channels, c.num_channels, 3, padding=1) if c.use_conv_refine else None
        )
        self.register_buffer("image_mean", torch.tensor(c.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(c.image_std).view(1, -1, 1, 1), persistent=False)
        self.gradient_checkpointing = False
        self._division_cache: dict = {}
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ImpureModel":
        """An untrained model of a named preset (see ``ImpureConfig.from_preset``)."""
        return cls(ImpureConfig.from_preset(name, **overrides))

    def set_attention_implementation(self, sdpa: bool = True) -> None:
        """Switch every block between SDPA (default) and the explicit softmax(QK^T)V form."""
        for module in self.modules():
            if isinstance(module, ImpureAttention):
                module.use_sdpa = sdpa

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

    # ------------------------------------------------------------------ division and positions
    def _division(self, division, batch: int, h: int, w: int, generator, device) -> torch.Tensor:
        """(N, L) permutation: subset k of sample n = ids_shuffle[n, k*Ls:(k+1)*Ls]."""
        L = h * w
        if division is None:
            division = self.config.train_division if self.training else self.config.eval_division
        if isinstance(division, torch.Tensor):
            ids = division.to(device=device, dtype=torch.long)
            if ids.shape != (batch, L):
                raise ValueError(f"an explicit division must have shape (N, L) = ({batch}, {L}), got {tuple(ids.shape)}")
            if not torch.equal(ids.sort(dim=1).values, torch.arange(L, device=device).expand(batch, L)):
                raise ValueError("an explicit division must be a permutation of the patch indices in each row")
            return ids
        if division == "uniform":
            key = (h, w, str(device))
            if key not in self._division_cache:  # built once per grid and device
                with torch.inference_mode(False):  # a normal tensor, usable later under autograd
                    self._division_cache[key] = uniform_division(h, w, self.config.num_subsets, device)
            return self._division_cache[key].expand(batch, L)
        if division == "random":
            return torch.argsort(_rand((batch, L), generator, device), dim=1)
        raise ValueError(f"division must be 'uniform', 'random' or an (N, L) permutation, got {division!r}")

    def _window_offset(self, noise: ImpureNoise, batch: int, h: int, w: int, generator, device) -> tuple[torch.Tensor, bool]:
        """(N, 2) (row, col) offsets of the h x w input window in the position grid, and whether
        every window lies inside the table (known without a device sync except for given offsets)."""
        grid = self.config.pos_grid
        if noise.window_offset is not None:
            offset = noise.window_offset.to(device=device, dtype=torch.long).view(batch, 2)
            inside = bool(offset.min() >= 0) and bool((offset.max(dim=0).values + torch.tensor([h, w], device=device) <= grid).all())
            return offset, inside
        if self.training and grid >= h and grid >= w:
            # release order: column offset drawn first, then row offset
            ox = _randint(0, grid - w + 1, (batch,), generator, device)
            oy = _randint(0, grid - h + 1, (batch,), generator, device)
            return torch.stack([oy, ox], dim=1), True
        # eval (or an input larger than the grid): centred; an odd gap's spare cell goes below/right
        # ("floor") or above/left ("ceil": the release's delta // 2 with delta = grid - h + 1)
        up = int(self.config.eval_window_rounding == "ceil")
        oy, ox = (grid - h + up) // 2, (grid - w + up) // 2
        return torch.tensor([oy, ox], device=device).expand(batch, 2), oy >= 0 and ox >= 0

    def _positions(self, table: torch.Tensor, offset: torch.Tensor, inside: bool, h: int, w: int) -> torch.Tensor:
        """(N, L, width) position embeddings of each patch for the given window offsets."""
        grid = self.config.pos_grid
        r = torch.arange(h, device=offset.device).view(1, h, 1) + offset[:, 0].view(-1, 1, 1)
        c = torch.arange(w, device=offset.device).view(1, 1, w) + offset[:, 1].view(-1, 1, 1)
        r, c = r.expand(-1, h, w).reshape(len(offset), -1), c.expand(-1, h, w).reshape(len(offset), -1)
        if inside:
            return table[0, 1:][r * grid + c]
        # the window leaves the table: the sin-cos formula extends to any cell
        return sincos_pos_embed(table.shape[-1], r, c).to(table)

    # ------------------------------------------------------------------ the three stages
    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, keep: tuple = ()) -> tuple[torch.Tensor, list]:
        kept = []
        for i, block in enumerate(blocks):
            if self.gradient_checkpointing and self.training:
                # transformers' activation_checkpointing_enable sets _gradient_checkpointing_func
                checkpoint = getattr(self, "_gradient_checkpointing_func", None) or partial(
                    torch.utils.checkpoint.checkpoint, use_reentrant=False
                )
                x = checkpoint(block.__call__, x)
            else:
                x = block(x)
            if i in keep:
                kept.append(x)
        return x, kept

    def forward_encoder(
        self, normalized: torch.Tensor, ids_shuffle: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode each subset on its own.

        Returns patch features (N, L, D) in PATCH order and the cls outputs (N, S, D).
        """
        S = self.config.num_subsets
        tokens = self.patch_embed(normalized) + pos
        N, L, D = tokens.shape
        # gather each subset's tokens: row n*S + k of the batch is subset k of sample n
        subsets = torch.gather(tokens, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, D)).reshape(N * S, L // S, D)
        x = torch.cat([self.cls_token.expand(N * S, -1, -1), subsets], dim=1)
        fusion = tuple(self.config.fusion_layers)
        x, kept = self._run_blocks(self.blocks, x, keep=fusion)
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
        return latent, heads

    def forward_decoder(
        self,
        latent: torch.Tensor,
        heads: torch.Tensor,
        fill: torch.Tensor,
        subset_of_patch: torch.Tensor,
        pos: torch.Tensor,
    ) -> torch.Tensor:
        """Reconstruct each subset from the others and stitch: (N, L, Dd) decoder features.

        ``latent`` (N, L, Dd) are the clean decoder features, ``fill`` (N, L, Dd) what replaces a
        subset's own features while it is reconstructed, both in patch order.
        """
        S = self.config.num_subsets
        N, L, Dd = latent.shape
        chunk = self.config.decoder_chunk_size or self._auto_decoder_chunk(N, L, latent.device)
        head_tokens = self._head_tokens(heads) if self.decoder_head_embed is not None else None
        out = torch.zeros_like(latent)
        for start in range(0, S, chunk):
            ks = torch.arange(start, min(start + chunk, S), device=latent.device)
            masked = subset_of_patch.unsqueeze(0) == ks.view(-1, 1, 1)  # (s, N, L)
            x = torch.where(masked.unsqueeze(-1), fill.unsqueeze(0), latent.unsqueeze(0)) + pos
            x = x.reshape(len(ks) * N, L, Dd)  # row (k - start) * N + n
            if head_tokens is not None:
                x = torch.cat([head_tokens[ks].reshape(len(ks) * N, 1, Dd), x], dim=1)
            x, _ = self._run_blocks(self.decoder_blocks, x)
            x = self.decoder_norm(x[:, -L:]).reshape(len(ks), N, L, Dd)
            # stitch: each patch keeps the reconstruction in which its own subset was hidden
            out = out + torch.where(masked.unsqueeze(-1), x, 0).sum(dim=0)
        return out

    # decoder tokens per call above which the subsets are decoded in chunks (measured in benchmarks/:
    # on CPU, one call over all N*S rows is no faster than a loop at large batch and holds S times
    # the activations; on a GPU, small batches gain from one call)
    DECODER_TOKEN_BUDGET = {"cpu": 16384, "cuda": 262144}

    def _auto_decoder_chunk(self, batch: int, tokens: int, device: torch.device) -> int:
        budget = self.DECODER_TOKEN_BUDGET.get(device.type, self.DECODER_TOKEN_BUDGET["cpu"])
        return max(1, min(self.config.num_subsets, budget // (batch * (tokens + 1))))

    def _head_tokens(self, heads: torch.Tensor) -> torch.Tensor:
        """(S, N, 1, Dd): for subset k, the cls outputs of the other subsets (ascending) -> Linear."""
        S = self.config.num_subsets
        N, _, D = heads.shape
        # others[k] = the S - 1 subsets other than k, ascending (built on the device: no host copy)
        j, k = torch.arange(S - 1, device=heads.device), torch.arange(S, device=heads.device)
        others = j.view(1, -1) + (j.view(1, -1) >= k.view(-1, 1)).long()
        concat = heads[:, others].reshape(N, S, (S - 1) * D).transpose(0, 1)  # (S, N, (S-1)*D)
        # decoder position row 0 is zero: the head token carries no position
        return (self.decoder_head_embed(concat) + self.decoder_pos_embed[0, 0]).unsqueeze(2)

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
        noise: Optional[ImpureNoise] = None,
        return_dict: Optional[bool] = None,
    ) -> Union[ImpureOutput, tuple]:
        r"""Purify ``pixel_values`` (N, C, H, W) in [0, 1].

        Args:
            generator: source of every random draw (window offset, division, noise steps, noise).
                A fixed generator gives identical output.
            division: ``"uniform"``, ``"random"`` or an explicit (N, L) permutation of patch
                indices (subset k = entries k*L/S .. (k+1)*L/S - 1). Default: the config's
                ``train_division`` in training, ``eval_division`` in eval mode.
            noise: an [`ImpureNoise`] with explicit draws, to replay a recorded forward.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        c = self.config
        noise = noise or ImpureNoise()
        h, w = self._check_input(pixel_values)
        N, L, S, device = pixel_values.shape[0], h * w, c.num_subsets, pixel_values.device

        offset, inside = self._window_offset(noise, N, h, w, generator, device)
        ids_shuffle = self._division(division, N, h, w, generator, device)
        subset_of_patch = torch.argsort(ids_shuffle, dim=1) // (L // S)  # (N, L)
        pos = self._positions(self.pos_embed, offset, inside, h, w)
        dpos = self._positions(self.decoder_pos_embed, offset, inside, h, w)

        normalized = (pixel_values - self.image_mean) / self.image_std
        # every random draw first, in a fixed order, so that chunking below cannot change them
        noisy = feature_t = feature_eps = None
        if c.image_mask == "noise":  # ImgNoise: features of a diffused copy of the image stand in
            t = self._steps(noise.image_noise_step, c.image_noise_steps, c.image_noise_eval_step, (N,), generator, device)
            eps = noise.image_noise if noise.image_noise is not None else _rand(normalized.shape, generator, device, normal=True)
            noisy = self.sqrt_alphas_cumprod[t].view(N, 1, 1, 1) * normalized + self.sqrt_one_minus_alphas_cumprod[t].view(N, 1, 1, 1) * eps.to(normalized)
        if c.feature_mask == "noise":  # FeaNoise: the stand-in features are diffused once more
            t = self._steps(noise.feature_noise_step, c.feature_noise_steps, c.feature_noise_eval_step, (N, S), generator, device)
            feature_t = torch.gather(t, 1, subset_of_patch)  # (N, L) step of each patch's subset
            feature_eps = noise.feature_noise if noise.feature_noise is not None else _rand((N, L, c.decoder_hidden_size), generator, device, normal=True)

        # without gradients, images go through in groups that bound the activations (same output)
        step = N if torch.is_grad_enabled() else self._auto_image_chunk(N, L, device)
        pieces = []
        for i in range(0, N, step):
            part = slice(i, i + step)
            pieces.append(self._reconstruct(
                normalized[part], None if noisy is None else noisy[part], ids_shuffle[part], subset_of_patch[part],
                pos[part], dpos[part], None if feature_t is None else feature_t[part], None if feature_eps is None else feature_eps[part], h, w,
            ))
        reconstruction = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        purified = (reconstruction * self.image_std + self.image_mean).clamp(0, 1)
        subset_index = subset_of_patch.view(N, h, w)
        if not return_dict:
            return purified, reconstruction, subset_index
        return ImpureOutput(purified_pixel_values=purified, reconstruction=reconstruction, subset_index=subset_index)

    def _reconstruct(self, normalized, noisy, ids_shuffle, subset_of_patch, pos, dpos, feature_t, feature_eps, h, w) -> torch.Tensor:
        """Encoder, decoder and prediction for a group of images whose random draws are made."""
        c, N = self.config, normalized.shape[0]
        if noisy is not None:
            # the clean and the noisy image share one batched encoder call (larger matmuls)
            latent, heads = self.forward_encoder(torch.cat([normalized, noisy]), ids_shuffle.repeat(2, 1), pos.repeat(2, 1, 1))
            z, fill = self.decoder_embed_norm(self.decoder_embed(latent)).split(N)
            heads = heads[:N]  # the head token comes from the clean pass
        else:
            latent, heads = self.forward_encoder(normalized, ids_shuffle, pos)
            z = self.decoder_embed_norm(self.decoder_embed(latent))
            fill = self.mask_token.expand(N, z.shape[1], -1) if c.image_mask == "occlude" else z
        if feature_t is not None:
            fill = self.sqrt_alphas_cumprod[feature_t].unsqueeze(-1) * fill + self.sqrt_one_minus_alphas_cumprod[feature_t].unsqueeze(-1) * feature_eps.to(fill)
        decoded = self.forward_decoder(z, heads, fill, subset_of_patch, dpos)
        reconstruction = self.unpatchify(self.decoder_pred(decoded), h, w)
        return reconstruction if self.decoder_rb1 is None else self.decoder_rb1(reconstruction)

    # Activation elements (images x patches x width) per encoder/decoder pass when no gradients are
    # taken: larger batches go through in groups of images. On CPU, groups of 4 ViT-B images were
    # 9 % faster than one pass over 16 and bound the activations (a single pass over 64 ViT-B images
    # held 2.2 GB); measured in benchmarks/. The output is the same: every random draw is made first.
    INFERENCE_ACTIVATION_BUDGET = {"cpu": 4 * 196 * 768, "cuda": 1 << 40}

    def _auto_image_chunk(self, batch: int, tokens: int, device: torch.device) -> int:
        budget = self.INFERENCE_ACTIVATION_BUDGET.get(device.type, self.INFERENCE_ACTIVATION_BUDGET["cpu"])
        return max(1, min(batch, budget // (tokens * self.config.hidden_size)))

    def _steps(self, given, low_high, eval_step, shape, generator, device) -> torch.Tensor:
        if given is not None:
            return given.to(device=device, dtype=torch.long).view(shape)
        if self.training:
            return _randint(low_high[0], low_high[1], shape, generator, device)
        return torch.full(shape, eval_step, device=device, dtype=torch.long)

    @torch.no_grad()
    def purify(self, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None, **kwargs) -> torch.Tensor:
        """Purified images in [0, 1] (no gradients); convenience for inference."""
        return self(pixel_values, generator=generator, return_dict=True, **kwargs).purified_pixel_values


__all__ = ["ImpureModel", "ImpurePreTrainedModel", "ImpureOutput", "ImpureNoise"]
