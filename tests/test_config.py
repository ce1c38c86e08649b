"""The Hydra config tree: every model and algorithm composes, the sweep axes are addressable
with their documented overrides, and invalid runs fail at config time with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT, compose_config

from editexp.config import CONFIG_DIR, ConfigError, run_settings
from editexp.models import ModelSpec

MODELS = sorted(path.stem for path in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
ALGORITHMS = ["rome", "memit", "emmet", "alphaedit"]


def test_all_documented_models_exist():
    assert set(MODELS) >= {
        "smollm2-135m",
        "llama3-8b",
        "llama2-7b",
        "gpt2-xl",
        "gpt-j-6b",
        "gemma3-270m",
        "tiny-llama3",
        "tiny-gpt2",
    }


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_model_and_algorithm_composes(model, algorithm):
    overrides = [f"model={model}", f"algorithm={algorithm}"]
    if algorithm == "rome":
        overrides.append("mode=singular")
    cfg = compose_config(*overrides)
    settings = run_settings(cfg)
    spec = ModelSpec.from_config(cfg.model)
    assert settings.layers == (cfg.model.default_layer,)
    assert spec.n_layers == cfg.model.n_layers
    assert "{}" in spec.edit_module
    assert settings.hparams.v_steps > 0
    if algorithm == "rome":
        assert settings.lam is None
    else:
        assert settings.lam == cfg.model.hparams[algorithm]["lambda"]


def test_sweep_axes_are_addressable():
    cfg = compose_config(
        "model=tiny-llama3",
        "algorithm=emmet",
        "layer=[1,2]",
        "batch_size=4",
        "lambda=0.001",
        "mode=sequential",
        "n_edits=8",
    )
    settings = run_settings(cfg)
    assert settings.layers == (1, 2)
    assert (settings.batch_size, settings.n_edits, settings.n_updates) == (4, 8, 2)
    assert settings.lam == 0.001 and settings.mode == "sequential"
    assert run_settings(compose_config("model=tiny-llama3", "layer=3")).layers == (3,)
    assert run_settings(compose_config("lambda=null")).lam == 1000.0


def test_batch_and_singular_modes_set_the_update_size():
    assert run_settings(compose_config("mode=batch", "n_edits=32")).batch_size == 32
    assert run_settings(compose_config("mode=singular", "algorithm=rome")).batch_size == 1


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["mode=sequential", "n_edits=10", "batch_size=4"], "divisible"),
        (["algorithm=rome", "mode=batch", "n_edits=4"], "ROME edits one fact"),
        (["algorithm=rome", "mode=sequential", "batch_size=2", "n_edits=4"], "ROME"),
        (["algorithm=rome", "mode=singular", "layer=[1,2]"], "single layer"),
        (["algorithm=rome", "mode=singular", "lambda=1.0"], "no meaning for ROME"),
        (["layer=30"], "outside model"),
        (["model=tiny-llama3", "layer=[1,9]"], r"layer=\[9\] is outside"),
        (["mode=parallel"], "mode='parallel'"),
        (["eval.schedule=sometimes"], "eval.schedule"),
        (["lambda=-1"], "lambda=-1"),
        (["n_edits=0"], "n_edits=0"),
        (["layer=[]"], "empty"),
        (["layer=1.5"], "layer=1.5; expected an int"),
        (["layer=true"], "layer=True; expected an int"),
        (["layer=[1,1]"], "repeats a layer"),
    ],
)
def test_invalid_runs_fail_at_config_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_settings(compose_config(*overrides))


@pytest.mark.parametrize("model", MODELS)
def test_cli_prints_the_composed_config(model):
    result = subprocess.run(
        [sys.executable, "-m", "editexp", f"model={model}", "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=PROJECT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"name: {model}" in result.stdout
    assert "edit: " in result.stdout


def test_every_conf_file_parses():
    from omegaconf import DictConfig, OmegaConf

    paths = sorted(Path(CONFIG_DIR).rglob("*.yaml"))
    assert Path(CONFIG_DIR) / "config.yaml" in paths
    assert {path.parent.name for path in paths} >= {"model", "algorithm", "experiment"}
    for path in paths:
        assert isinstance(OmegaConf.load(path), DictConfig), f"{path} is not a mapping"
