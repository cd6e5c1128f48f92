"""ImpureModel: sizes, the paper's core property, determinism, fast path == reference loop, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from impure_hf import ImpureConfig, ImpureModel, ImpureNoise
from impure_hf.modeling_impure import sincos_table, uniform_division

from conftest import real_photos, tiny_config, tiny_model

FIXTURES = Path(__file__).parent / "fixtures"


# ---------------------------------------------------------------------------------- sizes
def test_vit_b_parameter_count_and_release_keys():
    with torch.device("meta"):
        paper = ImpureModel(ImpureConfig.from_preset("impure-vit-b"))
        release = ImpureModel(ImpureConfig.from_preset("impure-vit-b-release"))
    trainable = sum(p.numel() for p in paper.parameters() if p.requires_grad)
    # ViT-B/16 encoder 85.8M + fusion 3.0M + decoder with head token 27.0M (README)
    assert trainable == 115_789_914
    reference = json.loads((FIXTURES / "release-vit-b-keys.json").read_text())
    expected = [(k["name"], tuple(k["shape"])) for k in reference["keys"]]
    mine = {name: tuple(t.shape) for name, t in release.state_dict().items()}
    assert sorted(mine.items()) == sorted(expected)
    assert sum(math.prod(s) for s in mine.values()) == reference["num_elements_total"]


def test_tiny_preset_builds_and_purifies():
    model = ImpureModel.from_preset("impure-vit-tiny").eval()
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def purify(seed: int) -> torch.Tensor:
        return model(x, generator=torch.Generator().manual_seed(seed)).purified_pixel_values

    out = purify(0)
    assert out.shape == (1, 3, 224, 224)
    torch.testing.assert_close(purify(0), out, rtol=0, atol=0)  # the generator fixes every draw
    # a rebuilt image, not the input passed through, and fresh noise for another seed
    assert (out - x).abs().mean() > 1e-2 and (purify(1) - out).abs().max() > 1e-3


def test_sincos_table_matches_mae_layout():
    table = sincos_table(8, 3)  # width 8: quarter 2
    assert table.shape == (1, 10, 8)
    assert torch.all(table[0, 0] == 0)
    # cell (gy=1, gx=2): first half encodes the column, second half the row
    omega = torch.tensor([1.0, 0.01])
    expected = torch.cat([(2 * omega).sin(), (2 * omega).cos(), omega.sin(), omega.cos()])
    torch.testing.assert_close(table[0, 1 + 1 * 3 + 2], expected)


# ---------------------------------------------------------------------------------- the core property
def _own_and_other_gradients(model, x, division):
    """For each output patch: |grad| on its own input patch and on the other subsets' patches."""
    p = model.config.patch_size
    N, _, H, W = x.shape
    h, w = H // p, W // p
    x = x.clone().requires_grad_(True)
    out = model(x, division=division, generator=torch.Generator().manual_seed(0))
    subsets = out.subset_index[0].reshape(-1)
    own, other = [], []
    for q in range(h * w):
        r, c = divmod(q, w)
        (grad,) = torch.autograd.grad(out.reconstruction[0, :, r * p : (r + 1) * p, c * p : (c + 1) * p].sum(), x, retain_graph=True)
        per_patch = grad[0].abs().sum(0).reshape(h, p, w, p).sum((1, 3)).reshape(-1)
        own.append(per_patch[q].item())
        other.append(per_patch[subsets != subsets[q]].sum().item())
    return torch.tensor(own), torch.tensor(other)


@pytest.mark.parametrize("division", ["uniform", "random"])
@pytest.mark.parametrize("feature_mask", ["none", "noise"])
@pytest.mark.parametrize("residual_fill", [None, "harmonic"])
def test_occlusion_no_output_patch_depends_on_its_own_input(division, feature_mask, residual_fill):
    model = tiny_model(use_conv_refine=False, image_mask="occlude", feature_mask=feature_mask, residual_fill=residual_fill).train()
    x = real_photos(n=1)
    own, other = _own_and_other_gradients(model, x, division)
    assert torch.all(own == 0), "an output patch depends on its own input patch"
    assert torch.all(other > 0), "an output patch ignores the other subsets"


@pytest.mark.parametrize("own_patch_gate", [False, True])
def test_residual_fill_starts_at_the_harmonic_control_and_learns_a_correction(own_patch_gate):
    from impure_hf.baselines import HarmonicInpainting

    x = real_photos(n=3)
    control = HarmonicInpainting(patch_size=tiny_config().patch_size)(x)
    untrained = ImpureModel(tiny_config(residual_fill="harmonic", own_patch_gate=own_patch_gate)).eval()
    out = untrained.purify(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, control, atol=1e-5, rtol=0)
    # the correction is the decoder's: with trained (here: perturbed) weights the output moves away
    moved = tiny_model(residual_fill="harmonic", own_patch_gate=own_patch_gate).eval()
    moved = moved.purify(x, generator=torch.Generator().manual_seed(0))
    assert (moved - control).abs().mean() > 1e-2


def test_own_patch_gate_moves_each_pixel_from_the_fill_to_its_own_noised_copy():
    from impure_hf.baselines import HarmonicInpainting

    x = real_photos(n=2)
    model = ImpureModel(tiny_config(residual_fill="harmonic", own_patch_gate=True)).eval()
    c = model.config
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    step = torch.full((2,), 30)
    copy = x + noise * (model.sqrt_one_minus_alphas_cumprod[30] / model.sqrt_alphas_cumprod[30]) * model.image_std
    control = HarmonicInpainting(patch_size=c.patch_size)(x)
    for g in (1.0, 0.25):
        with torch.no_grad():
            model.own_patch_gate.bias.fill_(g)
        out = model(x, noise=ImpureNoise(image_noise=noise, image_noise_step=step, feature_noise=torch.zeros(2, 64, c.decoder_hidden_size)))
        expected = (control + g * (copy - control)).clamp(0, 1)
        torch.testing.assert_close(out.purified_pixel_values, expected, atol=1e-5, rtol=0)


def test_image_noise_masking_only_lets_a_diffused_copy_through():
    # ImgNoise hides the subset behind noise rather than removing it: the own-patch path exists but is
    # scaled by sqrt(alpha_bar_t); with the conv refinement off, nothing else reaches the patch.
    model = tiny_model(use_conv_refine=False, image_mask="noise", feature_mask="none").eval()
    own, other = _own_and_other_gradients(model, real_photos(n=1), "uniform")
    assert torch.all(own > 0) and torch.all(other > 0)
    model.sqrt_alphas_cumprod.zero_()  # all signal in the noisy copy removed
    own, _ = _own_and_other_gradients(model, real_photos(n=1), "uniform")
    assert torch.all(own == 0)


# ---------------------------------------------------------------------------------- determinism
def test_fixed_generator_identical_other_generator_different(photos):
    model = tiny_model().train()
    run = lambda seed: model(photos, generator=torch.Generator().manual_seed(seed)).purified_pixel_values
    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert (run(3) - run(4)).abs().max() > 1e-3
    model.eval()
    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert (run(3) - run(4)).abs().max() > 1e-3  # fresh noise at eval, as the release


def test_eval_uses_uniform_division_and_fixed_steps(photos):
    model = tiny_model().eval()
    out = model(photos, generator=torch.Generator().manual_seed(0))
    r = torch.arange(8).view(8, 1)
    c = torch.arange(8).view(1, 8)
    expected = (r % 2) * 2 + c % 2
    assert torch.equal(out.subset_index, expected.expand(3, 8, 8))
    # fixed steps: passing the eval steps explicitly changes nothing
    noise = ImpureNoise(image_noise_step=torch.full((3,), 400), feature_noise_step=torch.full((3, 4), 600))
    same = model(photos, generator=torch.Generator().manual_seed(0), noise=noise)
    torch.testing.assert_close(out.reconstruction, same.reconstruction, rtol=0, atol=0)
    model.train()
    train_out = model(photos, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(train_out.subset_index, out.subset_index)


def test_uniform_division_is_ascending_inside_each_subset():
    ids = uniform_division(4, 6, 4)
    subsets = ids.view(4, 6)
    assert all(torch.all(s[1:] > s[:-1]) for s in subsets)
    assert subsets[0].tolist() == [0, 2, 4, 12, 14, 16]
    with pytest.raises(ValueError, match="square num_subsets"):
        uniform_division(4, 4, 2)


# ---------------------------------------------------------------------------------- fast path == reference loop
def _draw_noise(model, n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return ImpureNoise(
        window_offset=torch.randint(0, c.pos_grid - h + 1, (n, 2), generator=g),
        image_noise=torch.randn(n, 3, h * c.patch_size, w * c.patch_size, generator=g),
        image_noise_step=torch.randint(200, 600, (n,), generator=g),
        feature_noise=torch.randn(n, h * w, c.decoder_hidden_size, generator=g),
        feature_noise_step=torch.randint(200, 1000, (n, c.num_subsets), generator=g),
    )


def reference_forward(model, x, ids_shuffle, noise):
    """The method written as plainly as possible: a Python loop over samples and subsets."""
    c, S, p = model.config, model.config.num_subsets, model.config.patch_size
    N, _, H, W = x.shape
    h, w = H // p, W // p
    L, Ls = h * w, h * w // S
    sac, s1m = model.sqrt_alphas_cumprod, model.sqrt_one_minus_alphas_cumprod
    out = torch.zeros(N, 3, H, W)
    for n in range(N):
        oy, ox = noise.window_offset[n].tolist()
        cells = [(r + oy) * c.pos_grid + (cc + ox) for r in range(h) for cc in range(w)]
        pos, dpos = model.pos_embed[0, 1:][cells], model.decoder_pos_embed[0, 1:][cells]
        xn = (x[n : n + 1] - model.image_mean) / model.image_std
        t = noise.image_noise_step[n]
        noisy = sac[t] * xn + s1m[t] * noise.image_noise[n : n + 1]
        subsets = [ids_shuffle[n, k * Ls : (k + 1) * Ls] for k in range(S)]

        def encode(image):
            tokens = model.patch_embed(image)[0] + pos
            feats, heads = torch.zeros(L, c.hidden_size), []
            for idx in subsets:  # each subset on its own
                seq = torch.cat([model.cls_token[0], tokens[idx]]).unsqueeze(0)
                levels = []
                for i, block in enumerate(model.blocks):
                    seq = block(seq)
                    if i in c.fusion_layers:
                        levels.append(model.proj_layers[c.fusion_layers.index(i)](seq))
                weights = model.proj_weights.view(-1).softmax(0)
                seq = sum(wt * lv for wt, lv in zip(weights, levels + [seq]))
                seq = model.norm(seq)[0]
                heads.append(seq[0])
                feats[idx] = seq[1:]
            return feats, heads

        clean, heads = encode(xn)
        noisy_feats, _ = encode(noisy)
        z = model.decoder_embed_norm(model.decoder_embed(clean))
        zn = model.decoder_embed_norm(model.decoder_embed(noisy_feats))
        pred = torch.zeros(L, p * p * 3)
        for k, idx in enumerate(subsets):
            tk = noise.feature_noise_step[n, k]
            seq = z.clone()
            seq[idx] = sac[tk] * zn[idx] + s1m[tk] * noise.feature_noise[n, idx]
            seq = seq + dpos
            head = model.decoder_head_embed(torch.cat([heads[o] for o in range(S) if o != k]))
            seq = torch.cat([head.unsqueeze(0), seq]).unsqueeze(0)
            for block in model.decoder_blocks:
                seq = block(seq)
            pred[idx] = model.decoder_pred(model.decoder_norm(seq[0, 1:]))[idx]
        image = torch.zeros(3, H, W)
        for q in range(L):
            r, cc = divmod(q, w)
            image[:, r * p : (r + 1) * p, cc * p : (cc + 1) * p] = pred[q].view(p, p, 3).permute(2, 0, 1)
        out[n] = model.decoder_rb1(image.unsqueeze(0))[0]
    return out


@pytest.mark.parametrize("chunk, images_per_pass", [(None, None), (1, None), (3, None), (None, 1), (3, 3)])
def test_batched_and_chunked_decoder_equal_reference_loop(photos, chunk, images_per_pass, monkeypatch):
    model = tiny_model(pos_embed_grid=10, decoder_chunk_size=chunk).train()
    x = torch.cat([photos[:, :, :, :24], photos[:1, :, :, 4:28]])  # non-square 32x24, N=4
    n, h, w = len(x), 8, 6
    if images_per_pass is not None:  # inference in groups of images (3 + 1 or 1 + 1 + 1 + 1)
        budget = images_per_pass * h * w * model.config.hidden_size
        monkeypatch.setattr(ImpureModel, "INFERENCE_ACTIVATION_BUDGET", {"cpu": budget})
        with torch.no_grad():  # grouping happens only without gradients
            assert model._chunk_sizes(n, h * w, x.device)[0] == images_per_pass
    noise = _draw_noise(model, n, h, w, seed=5)
    ids = torch.argsort(torch.rand(n, h * w, generator=torch.Generator().manual_seed(9)), dim=1)
    with torch.no_grad():
        fast = model(x, division=ids, noise=noise).reconstruction
        slow = reference_forward(model, x, ids, noise)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


def test_window_offsets_change_positions_only_where_table_allows(photos):
    model = tiny_model(pos_embed_grid=12).eval()
    # eval: centred window, floor division: (12 - 8) // 2 = 2
    a = model(photos, noise=ImpureNoise(window_offset=torch.full((3, 2), 2)), generator=torch.Generator().manual_seed(1))
    b = model(photos, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=0, atol=0)
    # a 64-px input is larger than the 12x12 table: positions extend by the sin-cos formula
    big = model(torch.rand(1, 3, 64, 64), generator=torch.Generator().manual_seed(1))
    assert big.purified_pixel_values.shape == (1, 3, 64, 64)


# ---------------------------------------------------------------------------------- errors
def test_bad_inputs_have_clear_errors():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="30x32 is not divisible by the patch size 4"):
        model(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="3x3 patches .* cannot be split into 4 equal subsets"):
        model(torch.rand(1, 3, 12, 12))
    with pytest.raises(ValueError, match="uniform division .* 3x4 patches"):
        model(torch.rand(1, 3, 12, 16))
    with pytest.raises(ValueError, match="expected 3 channels, got 1"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="NaN or inf"):
        model(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        model(torch.rand(3, 32, 32))
    with pytest.warns(UserWarning, match=r"\[0, 1\]"):
        model(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match="permutation"):
        model(torch.rand(1, 3, 32, 32), division=torch.zeros(1, 64, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=30), "not divisible by patch_size"),
        (dict(num_subsets=3), "square num_subsets"),
        (dict(image_size=36), "divisible by 2"),
        (dict(image_mask="blur"), "image_mask must be one of"),
        (dict(residual_fill="bilinear"), "residual_fill must be one of"),
        (dict(own_patch_gate=True), "own_patch_gate needs residual_fill"),
        (dict(own_patch_gate=True, residual_fill="harmonic", image_mask="occlude"), "image_mask='noise'"),
        (dict(fusion_layers=(0, 9)), r"fusion_layers \[9\]"),
        (dict(image_noise_steps=(600, 200)), "image_noise_steps"),
        (dict(hidden_size=30), "divisible by num_attention_heads"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown IMPure preset 'vit-huge'"):
        ImpureConfig.from_preset("vit-huge")


def test_gradient_checkpointing_gives_same_gradients(photos):
    model = tiny_model().train()
    noise = _draw_noise(model, 3, 8, 8, seed=2)
    ids = uniform_division(8, 8, 4).expand(3, 64)

    def grads():
        model.zero_grad()
        model(photos, division=ids, noise=noise).reconstruction.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.gradient_checkpointing
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_first_call_under_inference_mode_does_not_poison_later_training_calls(photos):
    model = tiny_model().eval()
    with torch.inference_mode():
        model(photos)
    photos = photos.clone().requires_grad_(True)
    model(photos).reconstruction.sum().backward()  # the cached uniform division must be a normal tensor
    assert photos.grad is not None
