"""Shared fixtures: composed configs and models (tiny random ones, and the real SmolLM2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from editexp.config import CONFIG_DIR

PROJECT = Path(__file__).resolve().parents[1]
CONF_DIR = CONFIG_DIR
DEFAULT_DATA_DIR = PROJECT.parent / "shared" / "data"

# Tests read the shared data set unless the environment points elsewhere.
os.environ.setdefault("EDITEXP_DATA_DIR", str(DEFAULT_DATA_DIR))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# A whole run on the tiny Llama-3 in seconds: small statistics, one short GE fact, 3 value steps.
TINY_RUN = [
    "model=tiny-llama3",
    "stats.n_tokens=3000",
    "stats.seq_len=64",
    "eval.generation_facts=1",
    "eval.generation_length=20",
    "eval.held_out_keys=32",
    "editing.prefixes.count=2",
    "editing.prefixes.length=5",
    "model.hparams.rome.v_steps=3",
    "model.hparams.memit.v_steps=3",
    "model.hparams.emmet.v_steps=3",
]


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


_MODELS: dict[str, object] = {}


def cached_model(name: str):
    """Load a model once per test session (tests that edit weights must restore them)."""
    from editexp.models import load_model

    if name not in _MODELS:
        _MODELS[name] = load_model(compose_config(f"model={name}").model, "cpu")
    return _MODELS[name]


@pytest.fixture(scope="session")
def tiny_llama3():
    return cached_model("tiny-llama3")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return cached_model("tiny-gpt2")


@pytest.fixture(scope="session")
def smollm2():
    return cached_model("smollm2-135m")
