"""Conversion of the authors' checkpoint: safe loading, the key table, strictness, and equivalence.

The reference data in fixtures/reference/ was produced by running the authors' release
(NoWindButRain/IMPure @ 72f3edc) on a tiny configuration of their model class: its checkpoint in
their exact format, inputs, every random draw of each forward in call order, intermediate tensors
and outputs (../shared/reference/README.md). The converted model must replay those draws to 1e-5.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from impure_hf import ImpureConfig, ImpureModel, ImpureNoise
from impure_hf.cli import main as cli_main
from impure_hf.convert import (
    RELEASE_MASKS,
    convert_release_checkpoint,
    load_release_checkpoint,
    map_release_key,
    map_release_state_dict,
    release_config,
)

FIXTURES = Path(__file__).parent / "fixtures"
REF = FIXTURES / "reference"
CKPT = REF / "checkpoint.pth"
HEADS = ["--num-heads", "4", "--decoder-num-heads", "3"]  # invented tiny factory name: heads by flag
ATOL = 1e-5


def _load(name):
    return torch.load(REF / name, weights_only=True)


def _feature_noise(draws: list, ids_shuffle: torch.Tensor) -> torch.Tensor:
    """The release draws eps_fea_k per subset in shuffled order; ImpureNoise wants patch order."""
    shuffled = torch.cat([d["tensor"] for d in draws], dim=1)  # (N, L, Dd), position j <-> patch ids[n, j]
    return torch.zeros_like(shuffled).scatter_(1, ids_shuffle.unsqueeze(-1).expand_as(shuffled), shuffled)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, ImpureModel]:
    out = tmp_path_factory.mktemp("converted") / "impure-vit-tiny-release"
    assert cli_main(["convert", str(CKPT), "--out", str(out), "--config-from-args", *HEADS,
                     "--repo-id", "impure-hf/impure-vit-tiny-release"]) == 0
    return out, ImpureModel.from_pretrained(out).eval()


# ---------------------------------------------------------------------------------- configuration
def test_inferred_config_matches_the_release_constructor(converted):
    out, model = converted
    ref = json.loads((REF / "official_tiny_config.json").read_text())
    kw, derived = ref["constructor_kwargs"], ref["derived"]
    c = model.config
    assert (c.patch_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (
        kw["patch_size"], kw["embed_dim"], kw["depth"], kw["num_heads"])
    assert (c.decoder_hidden_size, c.decoder_num_hidden_layers, c.decoder_num_attention_heads) == (
        kw["decoder_embed_dim"], kw["decoder_depth"], kw["decoder_num_heads"])
    assert c.intermediate_size == kw["mlp_ratio"] * kw["embed_dim"] == derived["mlp_hidden_encoder"]
    assert c.decoder_intermediate_size == derived["mlp_hidden_decoder"]
    assert c.image_size == derived["input_size_HW"][0] and c.pos_grid == derived["pos_table_grid_G"]
    assert c.num_subsets == kw["chunks"] and list(c.fusion_layers) == kw["out_indices"]
    assert c.use_conv_refine == kw["use_conv"] and (c.image_mask, c.feature_mask) == ("noise", "noise")
    assert c.eval_division == "uniform"
    card = (out / "README.md").read_text()
    assert "Evaluation division: `uniform`" in card and "main_advpur" in card and "epoch 99" in card


# ---------------------------------------------------------------------------------- equivalence
def test_release_eval_forward_and_intermediates_match(converted):
    _, model = converted
    x, draws, ref = _load("inputs.pt"), _load("random_draws_eval.pt"), _load("outputs_eval.pt")
    inter = _load("intermediates_eval_subset.pt")
    ids = inter["ids_shuffle"]  # the release's unstable-argsort tie order (README section 7)
    captured: dict[str, list] = {}

    def keep(name, pre=False):
        def hook(module, args, output=None):
            captured.setdefault(name, []).append((args[0] if pre else output).detach())
        return hook

    handles = [
        model.blocks[0].register_forward_hook(keep("block0")),
        model.blocks[-1].register_forward_hook(keep("block9")),
        model.norm.register_forward_hook(keep("encoder_output")),
        model.decoder_embed_norm.register_forward_hook(keep("decoder_embedded")),
        model.decoder_head_embed.register_forward_hook(keep("head")),
        model.decoder_pred.register_forward_pre_hook(keep("stitched", pre=True)),
        model.decoder_pred.register_forward_hook(keep("pred")),
    ]
    noise = ImpureNoise(image_noise=draws[0]["tensor"], feature_noise=_feature_noise(draws[1:5], ids))
    with torch.no_grad():
        out = model(x, division=ids, noise=noise)
    for handle in handles:
        handle.remove()

    def close(actual, expected, name):
        torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL, msg=lambda m: f"{name}: {m}")

    # one encoder call holds the clean pass, then the noisy pass; rows n*S + k in both implementations
    rows = len(ids) * model.config.num_subsets
    clean_rows, noisy_rows = slice(0, rows), slice(rows, 2 * rows)
    close(captured["block0"][0][clean_rows], inter["encoder_block_0_output_clean"], "encoder block 0")
    close(captured["block9"][0][clean_rows], inter["encoder_block_9_output_clean"], "encoder block 9")
    close(captured["encoder_output"][0][clean_rows], inter["encoder_output_clean"], "fusion + norm (clean)")
    close(captured["encoder_output"][0][noisy_rows], inter["encoder_output_noisy"], "fusion + norm (noisy)")
    # our decoder features are in patch order, the release's in shuffled order
    shuffle = lambda t: torch.gather(t, 1, ids.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
    embedded_clean, embedded_noisy = captured["decoder_embedded"][0].split(len(ids))
    close(shuffle(embedded_clean), inter["decoder_embedded_clean"], "decoder_embed (clean)")
    close(shuffle(embedded_noisy), inter["decoder_embedded_noisy"], "decoder_embed (noisy)")
    S, N, Dd = captured["head"][0].shape
    close(captured["head"][0].reshape(S * N, 1, Dd), inter["head_tokens"], "head tokens")  # rows k*N + n
    close(captured["stitched"][0], inter["stitched_tokens"], "stitched decoder tokens")
    close(captured["pred"][0], inter["decoder_pred_output"], "decoder prediction")
    close(out.reconstruction, ref["pred_normalized_space"], "reconstruction")
    close(out.purified_pixel_values, ref["purified_clamped_0_1"], "purified")


def test_release_demo_forward_with_random_division_matches(converted):
    _, model = converted
    x, draws, ref = _load("inputs.pt"), _load("random_draws_eval_demo.pt"), _load("outputs_eval_demo.pt")
    ids = torch.argsort(draws[0]["tensor"], dim=1)  # demo.py: ids_shuffle = argsort(u)
    assert torch.equal(ids, ref["ids_shuffle"])
    noise = ImpureNoise(image_noise=draws[1]["tensor"], feature_noise=_feature_noise(draws[2:6], ids))
    with torch.no_grad():
        out = model(x, division=ids, noise=noise)
    torch.testing.assert_close(out.reconstruction, ref["pred_normalized_space"], rtol=0, atol=ATOL)
    torch.testing.assert_close(out.purified_pixel_values, ref["purified_clamped_0_1"], rtol=0, atol=ATOL)
    assert torch.equal(out.subset_index, ref["subset_of_patch_grid"])


VARIANTS = [("outputs_eval_nonoise.pt", key) for key in ("feature_mask=mask,img_mask=mask", "feature_mask=none,img_mask=none")] + [
    ("outputs_eval_single_noise.pt", key) for key in ("feature_mask=mask,img_mask=noise", "feature_mask=noise,img_mask=mask")]


@pytest.mark.parametrize("file,variant", VARIANTS)
def test_release_masking_variants_convert_and_match(tmp_path, file, variant):
    """Each release masking mode, saved the way the release saves that model, converts and replays."""
    record = _load(file)[variant]
    checkpoint = load_release_checkpoint(CKPT)
    checkpoint["args"].img_mask, checkpoint["args"].feature_mask = record["img_mask"], record["feature_mask"]
    for key in record["unexpected_keys_on_load"]:  # that variant's model has no noise tables
        del checkpoint["model"][key]
    torch.save(checkpoint, tmp_path / "variant.pth")
    model, info = convert_release_checkpoint(tmp_path / "variant.pth", preset=None, num_heads=4, decoder_num_heads=3)
    assert (model.config.image_mask, model.config.feature_mask) == RELEASE_MASKS[(record["img_mask"], record["feature_mask"])]

    x, ids = _load("inputs.pt"), _load("intermediates_eval_subset.pt")["ids_shuffle"]
    draws = record["random_draws"]
    noise = ImpureNoise()
    if model.config.image_mask == "noise":
        noise.image_noise = draws.pop(0)["tensor"]
    if model.config.feature_mask == "noise":
        noise.feature_noise = _feature_noise(draws, ids)
    with torch.no_grad():
        out = model(x, division=ids, noise=noise)
    torch.testing.assert_close(out.reconstruction, record["pred_normalized_space"], rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------- safe loading
def test_safe_loader_reads_the_namespace_checkpoint_that_plain_torch_load_refuses():
    with pytest.raises(Exception, match="Namespace"):
        torch.load(CKPT, weights_only=True)
    checkpoint = load_release_checkpoint(CKPT)
    assert isinstance(checkpoint["args"], argparse.Namespace) and checkpoint["epoch"] == 99
    assert set(checkpoint) == {"model", "optimizer", "epoch", "scaler", "args"}


def _numpy_lr_checkpoint(path: Path) -> None:
    """The checkpoint as the authors' fine-tuning script really saves it: lr computed with numpy."""
    checkpoint = load_release_checkpoint(CKPT)
    args = checkpoint["args"]
    args.lr = args.blr * np.mean(args.train_batch_sizes) / 256  # main_finetune: numpy float64
    for group in checkpoint["optimizer"]["param_groups"]:
        group["lr"] = group["initial_lr"] = args.lr
    torch.save(checkpoint, path)


def test_numpy_scalars_in_args_and_optimizer_load_safely(tmp_path):
    path = tmp_path / "numpy_lr.pth"
    _numpy_lr_checkpoint(path)
    pickled = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    assert any(g.startswith("numpy") for g in pickled), pickled  # the fixture really holds numpy scalars
    checkpoint = load_release_checkpoint(path)
    assert isinstance(checkpoint["args"].lr, np.float64)
    assert isinstance(checkpoint["optimizer"]["param_groups"][0]["lr"], np.float64)
    assert cli_main(["convert", str(path), "--out", str(tmp_path / "out"), "--config-from-args", *HEADS]) == 0


@pytest.mark.parametrize("value,name", [(Path("/checkpoints/run"), "pathlib"), (np.zeros(3), "numpy.ndarray")])
def test_other_pickled_globals_are_refused_by_name(tmp_path, value, name):
    checkpoint = load_release_checkpoint(CKPT)
    checkpoint["args"].output_dir = value
    torch.save(checkpoint, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=rf"{name}.*--trust-checkpoint"):
        load_release_checkpoint(tmp_path / "other.pth")
    trusted = load_release_checkpoint(tmp_path / "other.pth", trust_checkpoint=True)  # explicit opt-in only
    assert type(trusted["args"].output_dir) is type(value)


# ---------------------------------------------------------------------------------- key table, strictness
def test_key_table_maps_every_release_vit_b_key():
    reference = json.loads((FIXTURES / "release-vit-b-keys.json").read_text())
    with torch.device("meta"):
        model = ImpureModel(ImpureConfig.from_preset("impure-vit-b-release"))
        occlude = ImpureModel(ImpureConfig.from_preset("impure-vit-b-release", image_mask="occlude", feature_mask="none"))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {}
    for key in reference["keys"]:
        matched, target = map_release_key(key["name"])
        assert matched, f"release key {key['name']} has no entry in RELEASE_KEY_MAP"
        mapped[target or key["name"]] = tuple(key["shape"])
        assert (target is None) == key["dropped_by_release_loaders"], key["name"]  # rebuilt = the release's dropped
    assert mapped == expected
    # the release's mask/mask variant has the same keys minus the noise tables
    variant = {k for k in mapped if k not in reference["variant_mask_mask_keys"]["missing_vs_noise"]}
    assert variant == set(occlude.state_dict())


@pytest.fixture(scope="module")
def tiny_release() -> tuple[dict, ImpureModel]:
    checkpoint = load_release_checkpoint(CKPT)
    config = release_config(checkpoint["args"], checkpoint["model"], num_heads=4, decoder_num_heads=3)
    return checkpoint["model"], ImpureModel(config)


def test_training_only_keys_are_dropped_and_reported(tiny_release):
    state_dict, model = tiny_release
    extra = {**state_dict, "hgds.0.features.0.weight": torch.zeros(1), "dmodel.cls_token": torch.zeros(1)}
    mapped, dropped = map_release_state_dict(extra, model)
    assert sorted(dropped) == ["dmodel.cls_token", "hgds.0.features.0.weight"]
    assert set(mapped) == set(model.state_dict())


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda sd: sd.pop("decoder_rb1.bias"), r"missing.*decoder_rb1\.bias"),
        (lambda sd: sd.__setitem__("blocks.10.norm1.weight", torch.ones(32)), r"extra.*blocks\.10\.norm1\.weight"),
        (lambda sd: sd.__setitem__("skip_mask_token", torch.ones(1, 1, 24)), r"RELEASE_KEY_MAP.*skip_mask_token"),
        (lambda sd: sd.__setitem__("decoder_pred.bias", torch.ones(47)), r"wrongly shaped.*decoder_pred\.bias \(47,\)"),
        (lambda sd: sd.__setitem__("pos_embed", torch.zeros(1, 65, 32)), r"wrongly shaped.*pos_embed \(1, 65, 32\)"),
    ],
    ids=["missing", "extra", "unmapped", "wrong-shape", "wrong-shape-rebuilt-table"],
)
def test_strict_load_names_the_offending_key(tiny_release, edit, message):
    state_dict, model = tiny_release
    state_dict = dict(state_dict)
    edit(state_dict)
    with pytest.raises(ValueError, match=message):
        map_release_state_dict(state_dict, model)


def test_default_preset_refuses_the_tiny_checkpoint_naming_keys(tmp_path):
    with pytest.raises(ValueError, match=r"wrongly shaped keys.*cls_token \(1, 1, 32\)"):
        cli_main(["convert", str(CKPT), "--out", str(tmp_path / "out")])  # preset impure-vit-b-release


def test_unknown_factory_needs_head_flags(tmp_path):
    with pytest.raises(ValueError, match=r"--num-heads"):
        cli_main(["convert", str(CKPT), "--out", str(tmp_path / "out"), "--config-from-args"])


def test_conversion_script_runs(tmp_path, monkeypatch):
    script = Path(__file__).parents[1] / "conversion" / "convert_impure_checkpoint.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(CKPT), "--out", str(tmp_path / "out"), "--config-from-args", *HEADS])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    assert (tmp_path / "out" / "model.safetensors").exists() and not list((tmp_path / "out").glob("*.pth"))
