"""The algorithm registry: every model x algorithm resolves to the values the model YAMLs gave
before they named only what differs from the registry's defaults, unknown names fail once and
clearly, and a new algorithm needs only its module and its config."""

from __future__ import annotations

import pytest

from editexp.algorithms import ValueHparams, algorithm_names, get_algorithm
from editexp.config import ConfigError, compose, model_names, run_settings

# (model, algorithm): (lambda, nullspace_threshold, ValueHparams fields in order), as resolved
# from the model YAMLs when each of them spelled out every hyperparameter of every algorithm.
RESOLVED = {
    ("gemma3-270m", "rome"): (None, None, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("gemma3-270m", "memit"): (1000.0, None, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("gemma3-270m", "emmet"): (0.0, None, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("gemma3-270m", "alphaedit"): (1.0, 0.02, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("gpt-j-6b", "rome"): (None, None, (0.5, 20, 0.5, 0.0625, 4.0, 0.05)),
    ("gpt-j-6b", "memit"): (15000.0, None, (0.5, 25, 0.5, 0.0625, 0.75, 0.05)),
    ("gpt-j-6b", "emmet"): (0.0, None, (0.5, 25, 0.5, 0.0625, 0.75, 0.05)),
    ("gpt-j-6b", "alphaedit"): (1.0, 0.02, (0.5, 20, 0.5, 0.0625, 0.75, 0.05)),
    ("gpt2-xl", "rome"): (None, None, (0.5, 20, 0.5, 0.0625, 4.0, 0.05)),
    ("gpt2-xl", "memit"): (20000.0, None, (0.5, 20, 0.5, 0.0625, 0.75, 0.05)),
    ("gpt2-xl", "emmet"): (0.0, None, (0.5, 20, 0.5, 0.0625, 0.75, 0.05)),
    ("gpt2-xl", "alphaedit"): (1.0, 0.02, (0.5, 20, 0.5, 0.0625, 0.75, 0.05)),
    ("llama2-7b", "rome"): (None, None, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("llama2-7b", "memit"): (50000.0, None, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("llama2-7b", "emmet"): (0.0, None, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("llama2-7b", "alphaedit"): (1.0, 0.02, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("llama3-8b", "rome"): (None, None, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("llama3-8b", "memit"): (50000.0, None, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("llama3-8b", "emmet"): (0.0, None, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("llama3-8b", "alphaedit"): (1.0, 0.02, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("smollm2-135m", "rome"): (None, None, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("smollm2-135m", "memit"): (1000.0, None, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("smollm2-135m", "emmet"): (1e-4, None, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("smollm2-135m", "alphaedit"): (1.0, 0.02, (0.5, 25, 0.001, 0.0625, 4.0, 0.05)),
    ("tiny-gpt2", "rome"): (None, None, (0.5, 10, 0.001, 0.0625, 4.0, 0.05)),
    ("tiny-gpt2", "memit"): (100.0, None, (0.5, 10, 0.001, 0.0625, 4.0, 0.05)),
    ("tiny-gpt2", "emmet"): (0.0, None, (0.5, 10, 0.001, 0.0625, 4.0, 0.05)),
    ("tiny-gpt2", "alphaedit"): (0.0001, 0.0001, (0.5, 10, 0.001, 0.0625, 4.0, 0.05)),
    ("tiny-llama3", "rome"): (None, None, (0.5, 10, 0.001, 0.0625, 4.0, 0.05)),
    ("tiny-llama3", "memit"): (100.0, None, (0.5, 10, 0.001, 0.0625, 4.0, 0.05)),
    ("tiny-llama3", "emmet"): (0.0, None, (0.5, 10, 0.001, 0.0625, 4.0, 0.05)),
    ("tiny-llama3", "alphaedit"): (0.0001, 0.0001, (0.5, 10, 0.001, 0.0625, 4.0, 0.05)),
}
BUILTIN = ("rome", "memit", "emmet", "alphaedit")


def test_every_model_and_algorithm_is_in_the_table():
    assert set(RESOLVED) == {(m, a) for m in model_names() for a in BUILTIN}
    assert set(BUILTIN) <= set(algorithm_names())


@pytest.mark.parametrize(("model", "algorithm"), sorted(RESOLVED))
def test_model_yamls_with_registry_defaults_resolve_as_before(model, algorithm):
    lam, threshold, values = RESOLVED[(model, algorithm)]
    mode = "singular" if algorithm == "rome" else "batch"
    cfg = compose(model, algorithm, mode=mode)
    settings = run_settings(cfg)
    assert settings.lam == lam and type(settings.lam) is type(lam)
    assert settings.nullspace_threshold == threshold
    assert settings.hparams == ValueHparams(*values)
    # every algorithm's block is in the composed config: model.hparams.<name>.<key>=... works
    for name in BUILTIN:
        assert set(cfg.model.hparams[name]) == set(get_algorithm(name).defaults)


def test_an_override_of_another_algorithms_hparams_composes():
    cfg = compose("smollm2-135m", "memit", **{"model.hparams.alphaedit.v_steps": 3})
    assert cfg.model.hparams.alphaedit.v_steps == 3
    assert run_settings(cfg).hparams.v_steps == 25


@pytest.mark.parametrize("name", ["nope", 3, None])
def test_an_unknown_algorithm_is_one_clear_error(name):
    cfg = compose("tiny-llama3", "memit")
    cfg.algorithm.name = name
    with pytest.raises(ConfigError, match=r"algorithm=.*; expected one of alphaedit, emmet"):
        run_settings(cfg)
    with pytest.raises(ConfigError, match="expected one of"):
        compose("tiny-llama3", "nope")


def test_a_model_without_an_hparams_block_gets_the_registrys_defaults():
    cfg = compose("tiny-llama3", "alphaedit")
    del cfg.model.hparams
    settings = run_settings(cfg)
    defaults = get_algorithm("alphaedit").defaults
    assert settings.lam == defaults["lambda"] == 1.0
    assert settings.nullspace_threshold == defaults["nullspace_threshold"]
    assert settings.hparams == ValueHparams()
