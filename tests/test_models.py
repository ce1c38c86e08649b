"""Model specs and loading: errors name the bad value, and SmolLM2's dequantized GGUF copy is
cached.
"""

from __future__ import annotations

import copy

import pytest
from conftest import compose_config
from omegaconf import OmegaConf

from editexp.cache import cache_root
from editexp.models import ModelConfigError, ModelSpec


def test_model_spec_errors_name_the_value():
    cfg = compose_config("model=tiny-llama3").model
    for key, value, message in [
        ("source", "onnx", "model.source='onnx'"),
        ("dtype", "float32", "model.dtype=float32 is not a model setting.*precision="),
    ]:
        bad = OmegaConf.to_container(cfg)  # a plain dict: a key the config does not have
        bad[key] = value
        with pytest.raises(ModelConfigError, match=message):
            ModelSpec.from_config(bad)
    bad = copy.deepcopy(cfg)
    bad.modules.edit = "model.layers.mlp.down_proj"
    with pytest.raises(ModelConfigError, match="slot for the layer"):
        ModelSpec.from_config(bad)
    with pytest.raises(ModelConfigError, match="outside model"):
        ModelSpec.from_config(cfg).check_layers([0, 4])


@pytest.mark.slow
def test_smollm2_dequantized_copy_is_cached(smollm2):
    cached = list((cache_root() / "models").glob("smollm2-135m-*-float32"))
    assert cached and (cached[0] / "config.json").is_file()
    assert smollm2.identity.startswith("gguf:")
    assert smollm2.weight(1).shape == (576, 1536)
