"""Dummy-weight presets: every weight our specs make has the name and shape transformers' own model of the same
config has (built on the meta device, no memory), and none is missing."""

from __future__ import annotations

import pytest
import torch

from flexgen_lite.models.presets import _hf_dict, preset_config, preset_names
from flexgen_lite.models.specs import layer_specs


@pytest.mark.parametrize("name", preset_names())
def test_preset_weights_are_transformers_weights(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = _hf_dict(name)
    config = AutoConfig.for_model(fields.pop("model_type"), **{k: v for k, v in fields.items() if v is not None})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    theirs = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    ours = {w.hf_name: w.shape for layer in layer_specs(preset_config(name)) for w in layer.weights}
    assert ours.items() <= theirs.items()
    missing = set(theirs) - set(ours)
    assert missing <= {"lm_head.weight"} and (not missing or preset_config(name).tie_embeddings), missing
