"""transformers' common model and config tests run against a tiny ImpureModel, the way a
transformers maintainer checks a model (like tests/models/vit_mae/test_modeling_vit_mae.py).

The test files come from the transformers sdist of the installed version (tests/transformers_common.py);
without it (no registry reachable) this module is skipped with the reason.
"""

from __future__ import annotations

import unittest

import pytest
from torch import nn

import transformers_common

try:
    transformers_common.load()
    from transformers_common_tests.test_configuration_common import ConfigTester
    from transformers_common_tests.test_modeling_common import ModelTesterMixin, floats_tensor
except Exception as error:  # noqa: BLE001 - any failure to obtain the files is a reason to skip
    pytest.skip(f"transformers' common tests are not available: {error}", allow_module_level=True)

from impure_hf import ImpureConfig, ImpureModel


class ImpureModelTester:
    """A tiny ImpureModel and inputs for the common tests."""

    def __init__(self, parent, batch_size=2, image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, decoder_hidden_size=24,
                 decoder_num_hidden_layers=2, decoder_num_attention_heads=3, decoder_intermediate_size=40):
        self.parent = parent
        self.batch_size = batch_size
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
        self.num_subsets = 4
        # the encoder sees each subset alone: a cls token + L / S patches
        self.seq_length = 1 + (image_size // patch_size) ** 2 // self.num_subsets

    def get_config(self) -> ImpureConfig:
        return ImpureConfig(
            image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            decoder_hidden_size=self.decoder_hidden_size, decoder_num_hidden_layers=self.decoder_num_hidden_layers,
            decoder_num_attention_heads=self.decoder_num_attention_heads,
            decoder_intermediate_size=self.decoder_intermediate_size, num_subsets=self.num_subsets,
            fusion_layers=(0,),
            # The common tests assume that an eval forward is a function of the inputs (determinism,
            # batching, save/load, tuple-vs-dict equivalence). With occlusion and no feature noise it
            # is (uniform division, centred window); the noise-masked forward is stochastic by design
            # and its draws are tested by replay in test_modeling.py and test_conversion.py.
            image_mask="occlude",
            feature_mask="none",
        )

    def prepare_config_and_inputs(self):
        # images in [0, 1], as the model expects (floats_tensor's default scale is 1.0)
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class ImpureModelCommonTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (ImpureModel,)
    # the model has no token embeddings to resize, no position embeddings to resize (fixed sin-cos
    # tables that extend to any grid) and no heads whose shapes could mismatch on loading
    test_resize_embeddings = False
    test_resize_position_embeddings = False
    test_mismatched_shapes = False
    test_torch_exportable = False  # ExportTesterMixin is a stand-in (see transformers_common.STUBS)

    def setUp(self):
        self.model_tester = ImpureModelTester(self)
        self.config_tester = ConfigTester(self, config_class=ImpureConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    # vision model: the input embedding is the patch projection, not an nn.Embedding (as ViTMAE's test)
    def test_model_get_set_embeddings(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = ImpureModel(config)
        self.assertIsInstance(model.get_input_embeddings(), nn.Module)
        self.assertIs(model.get_input_embeddings(), model.patch_embed)
        output = model.get_output_embeddings()
        self.assertTrue(output is None or isinstance(output, nn.Linear))

    @unittest.skip(reason="ImpureModel takes images only: no input_ids / inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="ImpureModel takes images only: no input_ids / inputs_embeds")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    @unittest.skip(reason="no loss and no labels: training losses live in impure_hf.losses")
    def test_training(self):
        pass

    @unittest.skip(reason="no loss and no labels: training losses live in impure_hf.losses")
    def test_training_gradient_checkpointing(self):
        pass

    @unittest.skip(reason="no loss and no labels: training losses live in impure_hf.losses")
    def test_training_gradient_checkpointing_use_reentrant_false(self):
        pass

    @unittest.skip(reason="no loss and no labels: training losses live in impure_hf.losses")
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass
