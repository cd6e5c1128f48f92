"""Losses: equivalence with the authors' training forward (reference data), RCM, perceptual loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from impure_hf import ImpureConfig, ImpureModel, ImpureNoise
from impure_hf.losses import (
    PerceptualLoss,
    PurificationLoss,
    RandomCombination,
    RandomCombinationDraws,
    pixel_loss,
)

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
# the authors' tiny configuration (reference README section 2) in ImpureConfig terms
OFFICIAL_TINY = dict(
    image_size=32,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=10,
    num_attention_heads=4,
    intermediate_size=128,
    decoder_hidden_size=24,
    decoder_num_hidden_layers=2,
    decoder_num_attention_heads=3,
    decoder_intermediate_size=96,
    pos_embed_grid=16,
)


def _load(name: str):
    return torch.load(REFERENCE / name, weights_only=True)


@pytest.fixture(scope="module")
def reference():
    draws = [record["tensor"] for record in _load("random_draws_train.pt")]
    return _load("outputs_train.pt"), _load("intermediates_train.pt"), draws


@pytest.fixture(scope="module")
def release_vgg_loss():
    torch.manual_seed(2)  # the reference's VGG19-BN: random init right after this seed
    return PerceptualLoss.vgg19_bn_release(weights=None)


def official_tiny_model() -> ImpureModel:
    model = ImpureModel(ImpureConfig(**OFFICIAL_TINY))
    state = load_file(REFERENCE / "official_tiny_model.safetensors")
    # the release loaders drop the fixed position tables and rebuild them
    state = {k: v for k, v in state.items() if k not in ("pos_embed", "decoder_pos_embed")}
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["decoder_pos_embed", "pos_embed"] and not result.unexpected_keys
    return model


def replay_noise(draws: list, N: int, S: int, L: int, Dd: int) -> tuple[torch.Tensor, ImpureNoise]:
    """The recorded draws #0..#12 as an explicit division and ImpureNoise (README section 6)."""
    ids_shuffle = torch.argsort(draws[2], dim=1)
    Ls = L // S
    feature_noise = torch.zeros(N, L, Dd)
    for k in range(S):  # eps_k rows are in shuffled order: row j belongs to patch ids_shuffle[n, k*Ls + j]
        feature_noise.scatter_(1, ids_shuffle[:, k * Ls : (k + 1) * Ls, None].expand(-1, -1, Dd), draws[6 + 2 * k])
    noise = ImpureNoise(
        window_offset=torch.stack([draws[1].view(N), draws[0].view(N)], dim=1),  # (row, col) = (#1, #0)
        image_noise=draws[4],
        image_noise_step=draws[3],
        feature_noise=feature_noise,
        feature_noise_step=torch.stack([draws[5 + 2 * k] for k in range(S)], dim=1),
    )
    return ids_shuffle, noise


def test_reference_training_forward_and_losses(reference, release_vgg_loss):
    outputs, inter, draws = reference
    clean, adv = inter["clean_images_0_1"], inter["adv_images_0_1"]
    N, L = draws[2].shape

    # the full training forward through ImpureModel with the recorded draws
    model = official_tiny_model().train()
    ids_shuffle, noise = replay_noise(draws, N, model.config.num_subsets, L, model.config.decoder_hidden_size)
    assert torch.equal(ids_shuffle, inter["ids_shuffle"])
    reconstruction = model(adv, division=ids_shuffle, noise=noise).reconstruction
    torch.testing.assert_close(reconstruction, outputs["pred_normalized_space"], atol=1e-5, rtol=0)

    # RCM with the recorded draws #13..#15
    rcm = RandomCombination(patch_size=4, max_chunks=4)
    rcm_draws = RandomCombinationDraws(draws[13], int(draws[14]), int(draws[15]))
    pred = outputs["pred_normalized_space"]
    purified = pred * model.image_std + model.image_mean
    mixed = rcm(purified, adv, draws=rcm_draws)
    torch.testing.assert_close(mixed.mask, inter["rcm_mask"], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed.mixed, inter["rcm_mixed_image_0_1"], atol=1e-5, rtol=0)

    # each loss term on the recorded prediction
    objective = PurificationLoss(model.config.image_mean, model.config.image_std, release_vgg_loss, rcm)
    terms = objective(pred, clean, adv, rcm_draws=rcm_draws)
    expected = inter["loss_terms"]
    names = ["pixel", "perceptual/features.38", "perceptual/features.51", "perceptual/classifier.1"]
    for name, key in zip(names, ["loss", "hgd0_loss", "hgd1_loss", "hgd2_loss"]):
        torch.testing.assert_close(terms[name], expected[key], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(terms["loss"], outputs["loss_total"], atol=1e-5, rtol=0)

    # unlike the release, fp32 backward through the whole objective works and reaches the encoder
    terms = objective(reconstruction, clean, adv, rcm_draws=rcm_draws)
    torch.testing.assert_close(terms["loss"], outputs["loss_total"], atol=1e-5, rtol=0)
    terms["loss"].backward()
    grad = model.patch_embed.proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_rcm_draws_replay_and_mixing(photos):
    rcm = RandomCombination(patch_size=8, max_chunks=4)
    purified = photos.clone().requires_grad_(True)
    adversarial = (photos + 0.1 * torch.randn(photos.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    draws = rcm.draw(len(photos), 16, generator=torch.Generator().manual_seed(5))
    again = rcm.draw(len(photos), 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(draws.noise, again.noise) and (draws.num_chunks, draws.chunk_index) == (again.num_chunks, again.chunk_index)
    assert 2 <= draws.num_chunks <= 4 and 0 <= draws.chunk_index < draws.num_chunks

    out = rcm(purified, adversarial, generator=torch.Generator().manual_seed(5))
    replayed = rcm(purified, adversarial, draws=draws)
    assert torch.equal(out.mask, replayed.mask) and torch.equal(out.mixed, replayed.mixed)
    # the mask is constant on 8x8 patches and pastes the same number of patches in every sample
    patches = out.mask[:, 0].unfold(1, 8, 8).unfold(2, 8, 8)
    assert torch.equal(patches.amin(dim=(-1, -2)), patches.amax(dim=(-1, -2)))
    pasted = (patches[..., 0, 0] == 0).flatten(1).sum(dim=1)
    bounds = torch.linspace(0, 15, draws.num_chunks + 1, dtype=torch.float64).round().long()
    assert pasted.tolist() == [int(bounds[draws.chunk_index + 1] - bounds[draws.chunk_index])] * len(photos)
    # pasted patches are the adversarial pixels, the others the purified ones; gradient only through the latter
    keep = out.mask.bool()
    assert torch.equal(out.mixed[keep], purified[keep]) and torch.equal(out.mixed[~keep], adversarial[~keep])
    out.mixed.sum().backward()
    assert torch.equal(purified.grad, out.mask)

    with pytest.raises(ValueError, match="not divisible"):
        rcm(photos[..., :30, :30], adversarial[..., :30, :30])
    with pytest.raises(ValueError, match="min_chunks"):
        RandomCombination(patch_size=8, max_chunks=1)


def test_perceptual_loss_on_a_classifier(photos):
    import timm

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    loss = PerceptualLoss.from_classifier(classifier, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert loss.layers == ["blocks.4", "blocks.6", "classifier"] and loss.weights == [30.0, 10.0, 5.0]
    loss.train()
    assert not loss.extractor.training and not any(p.requires_grad for p in loss.parameters())

    noisy = (photos + 0.05 * torch.randn(photos.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    noisy.requires_grad_(True)
    same = loss(photos, photos)
    assert same["total"].item() == 0
    terms = loss(noisy, photos)
    assert set(terms) == {"blocks.4", "blocks.6", "classifier", "total"}
    assert all(terms[name] > 0 for name in loss.layers)
    torch.testing.assert_close(terms["total"], sum(terms[name] for name in loss.layers))
    terms["total"].backward()
    assert noisy.grad.abs().sum() > 0
    # the hooks are gone: the classifier is unchanged for other users
    assert all(not module._forward_hooks for module in classifier.modules())

    with pytest.raises(ValueError, match="unknown perceptual loss layer.*blocks.9"):
        PerceptualLoss(classifier, ["blocks.9"], [1.0])
    with pytest.raises(ValueError, match="2 layers but 1 weights"):
        PerceptualLoss(classifier, ["blocks.4", "blocks.6"], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        PerceptualLoss(classifier, ["blocks.4"], [-1.0])


def test_paper_vgg19_layers_and_pixel_loss(photos):
    torch.manual_seed(0)
    loss = PerceptualLoss.vgg19(weights=None)
    names = dict(loss.extractor.named_modules())
    # block-4 and block-5 ReLUs (each right before a max-pool) and the last linear layer (logits)
    assert [type(names[n]) for n in loss.layers] == [torch.nn.ReLU, torch.nn.ReLU, torch.nn.Linear]
    assert type(names[f"features.{int(loss.layers[0].split('.')[1]) + 1}"]) is torch.nn.MaxPool2d
    assert names[loss.layers[2]].out_features == 1000 and loss.weights == [30.0, 10.0, 5.0]
    target = torch.rand(photos.shape, generator=torch.Generator().manual_seed(1))
    assert torch.isclose(pixel_loss(photos, target), (photos - target).abs().mean())
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_loss(photos, target[:1])
