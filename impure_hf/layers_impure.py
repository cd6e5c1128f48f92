"""IMPure's building blocks: sin-cos position tables, the noise schedule, the uniform division,
random draws on a generator's device, the harmonic patch fill, and the transformer layers (attention through transformers'
interface, MLP, gradient-checkpointing block, patch embedding).

Split from modeling_impure.py, which assembles them into ``ImpureModel``, to keep both files short.
Like it, this file travels into Hub folders as remote code: it imports only ``configuration_impure``
(relatively) and third-party packages.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_impure import ImpureConfig


# ---------------------------------------------------------------------------------- helpers
def _is_tracing() -> bool:
    """True under torch.compile, torch.export and jit tracing: no data-dependent Python branches there."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or exporting() or torch.jit.is_tracing()


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
    lattice, so every patch's neighbours belong to other subsets. Deterministic (the order of a
    stable sort of the subset labels), unlike the release's unstable argsort whose tie order
    varies by device.
    """
    k = math.isqrt(num_subsets)
    if k * k != num_subsets:
        raise ValueError(f"the uniform division needs a square num_subsets (4, 9, ...), got {num_subsets}")
    if h % k or w % k:
        raise ValueError(
            f"the uniform division into {num_subsets} subsets needs a patch grid divisible by {k}, "
            f"got {h}x{w} patches"
        )
    # subset (a, b) = patches (a + k*i, b + k*j), listed row-major in (i, j): arithmetic only, no
    # sort, so it is cheap to rebuild at every call and traces to constants
    a = torch.arange(k, device=device).view(k, 1, 1, 1)
    b = torch.arange(k, device=device).view(1, k, 1, 1)
    i = torch.arange(h // k, device=device).view(1, 1, -1, 1)
    j = torch.arange(w // k, device=device).view(1, 1, 1, -1)
    return ((a + k * i) * w + b + k * j).reshape(-1)


class HarmonicPatchFill(nn.Module):
    """Each ``patch_size`` patch filled from the pixels around it, never from its own.

    Harmonic inpainting (the discrete Laplace equation): each patch is a hole whose Dirichlet
    boundary is the one-pixel ring of neighbouring patches' pixels around it (a Neumann boundary
    along the image border). Under the uniform division every neighbour of a patch lies in another
    subset, so this is RIAE's rule without learning. The fill is a fixed linear map of the ring,
    solved once per hole shape; its weights sum to one, so it commutes with per-channel
    normalisation. Used by the ``harmonic`` baseline and by ``ImpureConfig.residual_fill``.
    """

    def __init__(self, patch_size: int):
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        self.patch_size = int(patch_size)
        self._plans: dict = {}

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}"

    @staticmethod
    def _hole_solution(hh: int, ww: int, sides: tuple[bool, bool, bool, bool]) -> tuple[np.ndarray, np.ndarray]:
        """Harmonic fill of an hh x ww hole from its ring: (n, m) weights and (m, 2) ring offsets.

        ``sides`` says which of (top, bottom, left, right) has known pixels (False: image border).
        """
        top, bottom, left, right = sides
        ring = (
            [(-1, c) for c in range(ww) if top]
            + [(hh, c) for c in range(ww) if bottom]
            + [(r, -1) for r in range(hh) if left]
            + [(r, ww) for r in range(hh) if right]
        )
        ring_index = {pos: j for j, pos in enumerate(ring)}
        n = hh * ww
        laplacian = np.zeros((n, n))
        boundary = np.zeros((n, len(ring)))
        for r in range(hh):
            for c in range(ww):
                i = r * ww + c
                for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                    if 0 <= nr < hh and 0 <= nc < ww:
                        laplacian[i, i] += 1
                        laplacian[i, nr * ww + nc] -= 1
                    elif (nr, nc) in ring_index:
                        laplacian[i, i] += 1
                        boundary[i, ring_index[(nr, nc)]] += 1
                    # else: outside the image, Neumann (no term)
        return np.linalg.solve(laplacian, boundary), np.array(ring).reshape(-1, 2)

    def _plan(self, height: int, width: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
        """Groups of equally shaped holes: (hole pixel indices (K, n), ring indices (K, m), weights (n, m))."""
        key = (height, width, str(device))
        if key in self._plans:
            return self._plans[key]
        p = self.patch_size
        if height <= p and width <= p:
            raise ValueError(f"image {height}x{width} is a single {p}-pixel patch: nothing to inpaint it from")
        groups: dict = {}
        for y0 in range(0, height, p):
            for x0 in range(0, width, p):
                hh, ww = min(p, height - y0), min(p, width - x0)
                sides = (y0 > 0, y0 + hh < height, x0 > 0, x0 + ww < width)
                groups.setdefault((hh, ww, sides), []).append((y0, x0))
        plan = []
        for (hh, ww, sides), origins in groups.items():
            weights, ring = self._hole_solution(hh, ww, sides)
            origins = np.array(origins)
            rr, cc = np.divmod(np.arange(hh * ww), ww)
            holes = (origins[:, :1] + rr) * width + origins[:, 1:] + cc  # (K, n) flat pixel indices
            rings = (origins[:, :1] + ring[:, 0]) * width + origins[:, 1:] + ring[:, 1]  # (K, m)
            plan.append(
                (
                    torch.from_numpy(holes).to(device),
                    torch.from_numpy(rings).to(device),
                    torch.from_numpy(weights).float().to(device),
                )
            )
        self._plans[key] = plan
        return plan

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> the fill (N, C, H, W), unclamped."""
        n, c, h, w = images.shape
        flat = images.reshape(n, c, h * w)
        fills, holes = [], []
        for hole_index, ring_index, weights in self._plan(h, w, images.device):
            ring = flat[:, :, ring_index]  # (N, C, K, m)
            fills.append((ring @ weights.to(flat).T).reshape(n, c, -1))
            holes.append(hole_index.reshape(-1))
        # the holes tile the image exactly once: undo their concatenation order
        order = torch.argsort(torch.cat(holes))
        return torch.cat(fills, dim=-1)[:, :, order].reshape(n, c, h, w)


def _rand(shape, generator, device, dtype=torch.float32, normal=False):
    """Draw on the generator's device (or ``device`` for the global generator), then move."""
    fn = torch.randn if normal else torch.rand
    if generator is None:
        # no generator keyword at all: its overload needs concrete sizes, which breaks a compiled
        # forward once the batch dimension turns dynamic (a second batch size)
        return fn(shape, device=device, dtype=dtype)
    return fn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _randint(low, high, shape, generator, device):
    if generator is None:  # see _rand
        return torch.randint(low, high, shape, device=device)
    return torch.randint(low, high, shape, generator=generator, device=generator.device).to(device)


# ---------------------------------------------------------------------------------- layers
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QK^T * scaling) V written out (as ViTMAE's ``eager_attention_forward``)."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class ImpureAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm key names: qkv, proj).

    The kernel is transformers' attention interface chosen by ``config._attn_implementation``
    (``"eager"``, ``"sdpa"``, ``"flash_attention_2"``, ``"flex_attention"``, ...), read at every
    call so that ``model.set_attn_implementation(...)`` takes effect at once.
    """

    def __init__(self, config: ImpureConfig, dim: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # read by the sdpa / flash interfaces
        self.qkv = nn.Linear(dim, dim * 3, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention_interface(self, query, key, value, None, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.proj(output.reshape(batch, tokens, dim)), weights


class ImpureMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as timm and the release
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ImpureLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block; parameter names match timm's ``Block``.

    A ``GradientCheckpointingLayer``: ``model.gradient_checkpointing_enable()`` makes it recompute
    its activations in the backward pass.
    """

    def __init__(self, config: ImpureConfig, dim: int, num_heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = ImpureAttention(config, dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = ImpureMLP(dim, hidden)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), **kwargs)[0]
        return hidden_states + self.mlp(self.norm2(hidden_states))


class ImpurePatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, row-major (token r*w + c is patch (r, c))."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)
