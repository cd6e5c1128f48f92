"""ImpureModel as a transformers model: attention interface, checkpointing layers, hidden states,
tracing (torch.compile / torch.export)."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from impure_hf import ImpureModel, ImpureNoise
from impure_hf.modeling_impure import ImpureLayer

from conftest import tiny_model


def _count_sdpa(monkeypatch) -> list:
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def test_eager_and_sdpa_agree_and_eager_does_not_call_sdpa(photos, monkeypatch, tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path)
    calls = _count_sdpa(monkeypatch)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        assert model.config._attn_implementation == "sdpa"  # the default where torch has it
        sdpa = model(photos, generator=gen()).reconstruction
        assert len(calls) > 0
        calls.clear()
        eager_model = ImpureModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
        eager = eager_model(photos, generator=gen()).reconstruction
        assert calls == []
        # switching an existing model takes effect at once
        model.set_attn_implementation("eager")
        switched = model(photos, generator=gen()).reconstruction
        assert calls == []
    torch.testing.assert_close(eager, sdpa, rtol=0, atol=1e-5)
    torch.testing.assert_close(switched, eager, rtol=0, atol=0)


def test_deprecated_switch_still_works(photos, monkeypatch):
    model = tiny_model().eval()
    calls = _count_sdpa(monkeypatch)
    with pytest.warns(FutureWarning, match="set_attn_implementation"):
        model.set_attention_implementation(sdpa=False)
    model(photos[:1])
    assert calls == [] and model.config._attn_implementation == "eager"


def test_gradient_checkpointing_the_transformers_way(photos):
    model = tiny_model().train()
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(blocks) == model.config.num_hidden_layers + model.config.decoder_num_hidden_layers
    assert all(isinstance(b, ImpureLayer) for b in blocks)
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    calls = []
    for b in blocks:  # a checkpointed block runs again in the backward pass (from its first op;
        # torch stops the recomputation early once it has what backward needs)
        b.norm1.register_forward_pre_hook(lambda *_: calls.append(1))
    model(photos[:1]).reconstruction.sum().backward()
    plain = len(calls)
    enable()
    assert all(b.gradient_checkpointing for b in blocks)
    calls.clear()
    model(photos[:1]).reconstruction.sum().backward()
    assert len(calls) == 2 * plain  # forward + recomputation of every block
    disable()
    assert not any(b.gradient_checkpointing for b in blocks)


def test_input_embeddings_and_hidden_states(photos):
    model = tiny_model().eval()
    assert model.get_input_embeddings() is model.patch_embed
    c, S = model.config, model.config.num_subsets
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    out = model(photos, generator=gen(), output_hidden_states=True)
    assert len(out.hidden_states) == c.num_hidden_layers + 1
    L = (32 // c.patch_size) ** 2
    assert all(h.shape == (3 * S, 1 + L // S, c.hidden_size) for h in out.hidden_states)
    # the hidden states are the encoder's: its first state is the cls token + the subset's patch tokens
    torch.testing.assert_close(out.hidden_states[0][:, 0], model.cls_token[0].expand(3 * S, -1))
    plain = model(photos, generator=gen())
    assert plain.hidden_states is None
    torch.testing.assert_close(out.reconstruction, plain.reconstruction, rtol=0, atol=0)
    # return_dict=False: the same values as a tuple, in field order
    as_tuple = model(photos, generator=gen(), return_dict=False)
    assert len(as_tuple) == 3
    torch.testing.assert_close(as_tuple[1], plain.reconstruction, rtol=0, atol=0)
    # grouped inference (no gradients) returns the same hidden states as one pass
    with torch.no_grad():
        model.INFERENCE_ACTIVATION_BUDGET = {"cpu": 1}  # one image per pass
        grouped = model(photos, generator=gen(), output_hidden_states=True)
    for a, b in zip(grouped.hidden_states, out.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_division_argument_and_noise_division_are_exclusive(photos):
    model = tiny_model().eval()
    ids = torch.arange(64).expand(3, 64)
    with pytest.raises(ValueError, match="not both"):
        model(photos, division="uniform", noise=ImpureNoise(division=ids))
    a = model(photos, division=ids, generator=torch.Generator().manual_seed(0))
    b = model(photos, noise=ImpureNoise(division=ids), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- tracing
def test_torch_export_with_the_image_as_the_only_input(photos):
    model = tiny_model().eval()
    program = torch.export.export(model, (photos,))
    # the noise draws are ops of the graph, from the global RNG: the same seed gives eager's output
    torch.manual_seed(7)
    exported = program.module()(photos).reconstruction
    torch.manual_seed(7)
    eager = model(photos).reconstruction
    torch.testing.assert_close(exported, eager, rtol=0, atol=1e-5)
    torch.manual_seed(8)
    assert not torch.allclose(program.module()(photos).reconstruction, eager)  # really drawn per call


def test_torch_compile_fullgraph(photos):
    model = tiny_model().eval()
    # backend="eager" checks what fullgraph=True promises (one graph, no breaks: the input checks
    # that read the data are skipped while tracing) without minutes of C++ compilation on CPU
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.manual_seed(3)
    a = compiled(photos).purified_pixel_values
    torch.manual_seed(3)
    b = model(photos).purified_pixel_values
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="NaN or inf"):  # eager keeps its checks
        model(torch.full_like(photos, float("nan")))


def test_attentions_in_eager_and_vitmae_style_noise(photos):
    model = tiny_model().eval()
    model.set_attn_implementation("eager")
    c, S, L = model.config, model.config.num_subsets, 64
    out = model(photos, generator=torch.Generator().manual_seed(0), output_attentions=True)
    assert len(out.attentions) == c.num_hidden_layers
    rows = 1 + L // S
    assert all(a.shape == (3 * S, c.num_attention_heads, rows, rows) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(3 * S, c.num_attention_heads, rows))
    # a plain (N, L) tensor is ViTMAE's noise: its argsort is the division
    vitmae_noise = torch.rand(3, L, generator=torch.Generator().manual_seed(1))
    a = model(photos, noise=vitmae_noise, generator=torch.Generator().manual_seed(2)).reconstruction
    b = model(photos, division=vitmae_noise.argsort(dim=1), generator=torch.Generator().manual_seed(2)).reconstruction
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_in_training_with_and_without_a_generator(photos):
    model = tiny_model().train()
    # without a generator the training draws (window, division, steps, noise) are graph ops
    fullgraph = torch.compile(model, fullgraph=True, backend="eager")
    torch.manual_seed(5)
    a = fullgraph(photos).reconstruction
    torch.manual_seed(5)
    torch.testing.assert_close(a, model(photos).reconstruction, rtol=0, atol=1e-5)
    # with one (as the trainer passes) the draws run eagerly from it: the same output as eager
    compiled = torch.compile(model, backend="eager")
    b = compiled(photos, generator=torch.Generator().manual_seed(6)).reconstruction
    c = model(photos, generator=torch.Generator().manual_seed(6)).reconstruction
    torch.testing.assert_close(b, c, rtol=0, atol=1e-5)


def test_compiled_model_takes_a_new_batch_size_without_breaking():
    """A second batch size makes the batch dimension dynamic in the compiled graph; the noise draws
    (from the global RNG) must still trace (they did not while passing ``generator=None``)."""
    model = tiny_model().eval()
    compiled = torch.compile(model, backend="eager")
    with torch.inference_mode():
        for n in (2, 3, 4):
            assert compiled(torch.rand(n, 3, 32, 32)).purified_pixel_values.shape == (n, 3, 32, 32)
