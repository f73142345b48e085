"""Dummy-weight presets: every weight our specs make has the name and shape transformers' own model of the same
config stores (built on the meta device, no memory), and none is missing."""

from __future__ import annotations

import pytest
import torch

from flexgen_lite.models.presets import _hf_dict, preset_config, preset_names
from flexgen_lite.models.specs import layer_specs


@pytest.mark.parametrize("name", preset_names())
def test_preset_weights_are_transformers_weights(name):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    fields = _hf_dict(name)
    config = AutoConfig.for_model(fields.pop("model_type"), **{k: v for k, v in fields.items() if v is not None})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # as a checkpoint stores them (transformers keeps a MoE's experts as one tensor, saves each on its own)
    # GraniteMoE's are stacks (experts, rows, cols): ours are ranges of the rows of all of them
    theirs = {n: (p.shape[0] * p.shape[1], *p.shape[2:]) if p.dim() == 3 else tuple(p.shape)
              for n, p in revert_weight_conversion(model, model.state_dict()).items()}
    ours, rows = {}, {}
    for w in (w for layer in layer_specs(preset_config(name)) for w in layer.weights):
        stored, first, total = w.stored  # rows of a fused matrix (Phi-3): together they cover it
        ours[stored] = (total, *w.shape[1:])
        rows.setdefault(stored, set()).update(range(first, first + w.shape[0]))
    assert ours.items() <= theirs.items()
    assert all(len(covered) == ours[n][0] for n, covered in rows.items())
    missing = set(theirs) - set(ours)
    assert missing <= {"lm_head.weight"} and (not missing or preset_config(name).tie_embeddings), missing
