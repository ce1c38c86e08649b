"""Shared fixtures: composed configs, models (tiny random ones, float64 copies, the real
SmolLM2), the CounterFact data folder, a cache of each test's own, a finished tiny run."""

from __future__ import annotations

import copy
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
# The bf16 code paths are tested on every CPU, also where bfloat16 matmuls are emulated (slow,
# but the tiny models keep them small); editexp refuses such a CPU to users (precision.py).
os.environ.setdefault("EDITEXP_ALLOW_EMULATED_BF16", "1")

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

# Small statistics and prefixes, as keyword overrides for ``Editor.from_pretrained``.
FAST_EDITING = {
    "stats.n_tokens": 3000,
    "stats.seq_len": 64,
    "eval.held_out_keys": 32,
    "editing.prefixes.count": 2,
    "editing.prefixes.length": 5,
}
# Two facts as a library user writes them (dicts; "{}" is where the subject goes).
EXAMPLE_FACTS = [
    {
        "prompt": "{} was invented in the city of",
        "subject": "The Velloran harp",
        "target_new": "Lisbon",
    },
    {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
    },
]

# Prompts of several lengths (one shares a prefix with another) with one to three targets,
# single- and multi-token: the scoring and generation tests' inputs.
PROMPTS = [
    "The capital of France is",
    "Hi",
    "Autonomous University of Madrid, which is located in",
    "and Sallie Beavers Riley. Autonomous University of Madrid is located in",
    "Danielle Darrieux's mother tongue is",
]
TARGETS = [
    ["Paris", "Berlin"],
    ["there", "Xylophone orchestra of the north"],
    ["Sweden", "Spain"],
    ["the Kingdom of Sweden", "Spain"],
    ["English", "French", "Old Church Slavonic"],  # three targets: any number is allowed
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


@pytest.fixture(params=["tiny-llama3", "tiny-gpt2"])
def tiny(request):
    """Each tiny model in turn (shared by the session: a test that edits weights restores them)."""
    return cached_model(request.param)


def float64_copy(name: str):
    """A float64 copy of a model, so that two computations agree far below float32's
    rounding (~1e-10)."""
    from editexp.precision import get_precision

    loaded = copy.copy(cached_model(name))
    loaded.model = copy.deepcopy(loaded.model).double()
    loaded.precision = get_precision("64-true")
    return loaded


@pytest.fixture(scope="module", params=["tiny-llama3", "tiny-gpt2"])
def model64(request):
    """A float64 copy of each tiny model, shared by a test module."""
    return float64_copy(request.param)


@pytest.fixture(params=["tiny-llama3", "tiny-gpt2"])
def own_model64(request):
    """A float64 copy of each tiny model for one test alone (it may leave its edits there)."""
    return float64_copy(request.param)


def counterfact_dir() -> str:
    """The data folder holding ``counterfact/counterfact.json``; skips the test without one."""
    data_dir = os.environ["EDITEXP_DATA_DIR"]
    if not os.path.isfile(os.path.join(data_dir, "counterfact", "counterfact.json")):
        pytest.skip(f"no CounterFact file under {data_dir}")
    return data_dir


@pytest.fixture(scope="session")
def counterfact_facts():
    """Three facts of the shared CounterFact file, in the seeded order."""
    from editexp.data.counterfact import load_counterfact, select_facts

    facts, _ = load_counterfact(compose_config(f"data.dir={counterfact_dir()}").data)
    return select_facts(facts, 3, order="seeded", seed=0)


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    """The largest difference between two tables of scores of the same shape."""
    assert [len(row) for row in a] == [len(row) for row in b]
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own (``$EDITEXP_CACHE_DIR``, empty at the start)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(path))
    return path


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working directory of its own, and a cache beside it."""
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    directory = tmp_path / "work"
    directory.mkdir()
    monkeypatch.chdir(directory)
    return directory


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the runner loads a model (user errors come before it)."""
    import editexp.runner as runner_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(runner_module, "load_model", must_not_load)


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished two-update tiny run and the cache it filled (copy them before changing them)."""
    from console_scripts import TWO_UPDATES, editexp

    root = tmp_path_factory.mktemp("finished")
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDITEXP_CACHE_DIR", str(cache))
        result = editexp(root / "run", *TWO_UPDATES)
    assert result.code == 0, result.err
    return root / "run", cache
