"""Dummy-weight presets: every weight our specs make has the name and shape transformers' own model of the same
config stores (built on the meta device, no memory), and none is missing; gpt-oss's experts, columns of
transposed stacks, cover every expert's every column."""

from __future__ import annotations

import pytest
import torch

from flexgen_lite.models.hf_config import config_from_dict
from flexgen_lite.models.presets import _hf_dict, preset_config, preset_names
from flexgen_lite.models.specs import layer_specs


@pytest.mark.parametrize("name", preset_names())
def test_preset_weights_are_transformers_weights(name):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    fields = _hf_dict(name)
    kind = fields.pop("model_type")
    full = AutoConfig.for_model(kind, **{k: v for k, v in fields.items() if v is not None})
    assert preset_config(name).num_layers == full.num_hidden_layers
    # two layers of each side (every preset's layers store the same names and shapes; building 96 of OPT-175B's
    # took 3 s): ours from the same fields
    fields["num_hidden_layers"] = 2
    config = AutoConfig.for_model(kind, **{k: v for k, v in fields.items() if v is not None})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # as a checkpoint stores them (transformers keeps a MoE's experts as one tensor, saves each on its own)
    # GraniteMoE's are stacks (experts, rows, cols): ours are ranges of the rows of all of them
    stored_shapes = {n: tuple(p.shape) for n, p in revert_weight_conversion(model, model.state_dict()).items()}
    theirs = {n: (s[0] * s[1], *s[2:]) if len(s) == 3 else s for n, s in stored_shapes.items()}
    ours, rows, picked = {}, {}, {}
    for w in (w for layer in layer_specs(config_from_dict({**fields, "model_type": kind}, name=name))
              for w in layer.weights):
        if w.picked is not None:  # gpt-oss: columns of one expert's (in, out) matrix, transposed
            stack, expert, first, step = w.picked
            implied = (w.shape[1], w.shape[0] * step) if len(w.shape) == 2 else (w.shape[0] * step,)
            assert stored_shapes[stack][1:] == implied, (w.hf_name, stored_shapes[stack])
            picked.setdefault(stack, set()).add((expert, first, step))
            continue
        stored, first, total = w.stored  # rows of a fused matrix (Phi-3): together they cover it
        ours[stored] = (total, *w.shape[1:])
        rows.setdefault(stored, set()).update(range(first, first + w.shape[0]))
    assert ours.items() <= theirs.items()
    assert all(len(covered) == ours[n][0] for n, covered in rows.items())
    for stack, parts in picked.items():  # every expert, and all of its columns (gate and up interleaved)
        experts = stored_shapes[stack][0]
        assert {e for e, _, _ in parts} == set(range(experts))
        assert all(len({f for e, f, _ in parts if e == x}) == next(s for e, _, s in parts if e == x)
                   for x in range(experts))
    missing = set(theirs) - set(ours) - set(picked)
    assert missing <= {"lm_head.weight"} and (not missing or preset_config(name).tie_embeddings), missing
