"""editexp as a library: the Editor, the Evaluator, load_model and compose without Hydra, the
README's "From Python" example and examples/edit_one_fact.py, on tiny models."""

from __future__ import annotations

import copy
import re
import runpy
import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLE_FACTS, FAST_EDITING, PROJECT, cached_model

import editexp
from editexp import Editor, Evaluator
from editexp.config import ConfigError, compose
from editexp.data.counterfact import load_counterfact, select_facts
from editexp.editing.editor import BatchEdit, edit_batch
from editexp.editing.linalg import EditingError
from editexp.editing.plan import UpdatePlan
from editexp.models import ModelConfigError, load_model, wrap_model


def fresh(name: str):
    """A private copy of a session model (editing tests must not leak edits)."""
    loaded = copy.copy(cached_model(name))
    loaded.model = copy.deepcopy(loaded.model)
    return loaded


def test_config_does_not_import_torch():
    code = "import sys, editexp.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PROJECT)


def test_compose_takes_keyword_overrides_and_names_bad_keys():
    cfg = compose("tiny-llama3", "emmet", lam=0.5, layer=[1, 2], **{"stats.n_tokens": 7})
    assert cfg["lambda"] == 0.5 and list(cfg.layer) == [1, 2] and cfg.stats.n_tokens == 7
    assert cfg.model.name == "tiny-llama3" and cfg.algorithm.name == "emmet"
    assert compose("tiny-llama3", "rome").mode == "singular"
    with pytest.raises(ConfigError, match="no key 'stats.n_token'"):
        compose("tiny-llama3", **{"stats.n_token": 7})
    with pytest.raises(ConfigError, match="model='nope'"):
        compose("nope")


def test_load_model_takes_a_name_a_config_or_a_hf_directory(tmp_path):
    by_name = editexp.load_model("tiny-llama3", "cpu")
    by_config = load_model(compose("tiny-llama3").model, "cpu")
    assert by_name.identity == by_config.identity == cached_model("tiny-llama3").identity
    by_name.model.save_pretrained(tmp_path / "hf")
    by_name.tokenizer.save_pretrained(tmp_path / "hf")
    from_dir = load_model(str(tmp_path / "hf"), "cpu")
    assert from_dir.identity.startswith("hf:") and from_dir.spec.n_layers == 4
    assert from_dir.spec.edit_module == "model.layers.{}.mlp.down_proj"
    torch.testing.assert_close(from_dir.weight(1), by_name.weight(1), rtol=0, atol=0)


def test_wrap_model_finds_module_paths_from_conf_model():
    gpt2 = cached_model("tiny-gpt2")
    wrapped = wrap_model(gpt2.model, gpt2.tokenizer)
    assert wrapped.spec.conv1d and wrapped.spec.edit_module == "transformer.h.{}.mlp.c_proj"
    assert wrapped.spec.n_layers == 3 and wrapped.config["hparams"]["memit"]["lambda"] > 0

    class Unknown(torch.nn.Module):
        pass

    with pytest.raises(ModelConfigError, match="pass modules="):
        wrap_model(Unknown(), gpt2.tokenizer)


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-gpt2"])
def test_editor_update_revert_save_apply(name, tmp_path):
    loaded = fresh(name)
    original = loaded.weight(1).detach().clone()
    editor = Editor.from_pretrained(loaded, algorithm="memit", layer=1, **FAST_EDITING)
    update = editor.edit(EXAMPLE_FACTS)
    assert update.case_ids == [0, 1] and set(update.deltas) == {1}
    assert update.delta_norm == pytest.approx(float(update.deltas[1].norm()))
    assert update.delta_norm > 0
    assert update.value_steps > 0 and update.preservation_error > 0
    assert set(update.timing) == {"keys_values", "solve"}
    torch.testing.assert_close(loaded.weight(1), original + update.deltas[1], rtol=1e-6, atol=1e-6)
    edited = loaded.weight(1).detach().clone()
    path = update.save(tmp_path / "deltas.pt")
    update.revert()
    assert torch.equal(loaded.weight(1), original)
    editor.apply(path)
    torch.testing.assert_close(loaded.weight(1), edited, rtol=0, atol=1e-6)
    with pytest.raises(EditingError, match="revertible=False"):
        editor.edit(EXAMPLE_FACTS[:1], revertible=False).revert()


def test_editor_computes_what_edit_batch_computes(tmp_path, monkeypatch):
    """The Editor adds nothing to the math: same deltas as edit_batch on the same pieces.
    (An empty cache of its own: values another test cached at another thread count would
    differ from edit_batch's in the last float32 bits.)"""
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    loaded = fresh("tiny-llama3")
    editor = Editor.from_pretrained(loaded, algorithm="emmet", lam=0.01, **FAST_EDITING)
    snapshot = loaded.weight(1).detach().clone()
    update = editor.edit(EXAMPLE_FACTS)
    update.revert()
    direct: BatchEdit = edit_batch(
        loaded,
        [editexp.editing.editor.as_request(fact, i) for i, fact in enumerate(EXAMPLE_FACTS)],
        UpdatePlan("emmet", [1], 0.01, editor.hparams, progress=False),
        editor.covariances,
        editor.prefixes,
    )
    torch.testing.assert_close(direct.deltas[1], update.deltas[1], rtol=0, atol=0)
    loaded.weight(1).data.copy_(snapshot)


def test_editor_from_a_loaded_transformers_model():
    loaded = fresh("tiny-llama3")
    editor = Editor.from_pretrained(
        loaded.model, loaded.tokenizer, algorithm="rome", **FAST_EDITING
    )
    assert editor.settings.algorithm == "rome" and editor.settings.layers == (1,)
    with pytest.raises(EditingError, match="ROME edits one fact per update"):
        editor.edit(EXAMPLE_FACTS)
    with pytest.raises(EditingError, match="'target_new'"):
        editor.edit({"prompt": "{} is", "subject": "x"})
    editor.edit(EXAMPLE_FACTS[0]).revert()


@pytest.fixture(scope="module")
def facts():
    cfg = compose("tiny-llama3")
    return select_facts(load_counterfact(cfg.data)[0], 3, order="file")


def test_evaluator_scores_typed_results_and_caches_pre_edit(facts, monkeypatch):
    evaluator = Evaluator(cached_model("tiny-llama3"), generation_length=12)
    first = facts[0].case_id
    results = evaluator.score(facts[::-1], generate_for={first})
    assert [r.case_id for r in results] == [f.case_id for f in facts[::-1]]
    assert results[-1].GE is not None and results[0].GE is None
    assert set(results[0].metrics()) >= {"ES", "PS", "NS", "NS_magnitude"}
    pre = evaluator.pre_edit(facts, generate_for={first})
    assert pre == results[::-1]
    monkeypatch.setattr(evaluator, "score", lambda *a, **k: pytest.fail("not read from cache"))
    assert evaluator.pre_edit(facts, generate_for={first}) == pre


def test_evaluator_compare():
    evaluator = Evaluator(cached_model("tiny-llama3"))
    comparison = evaluator.compare("The capital of France is", "Paris", "Berlin")
    assert comparison.preferred in ("Paris", "Berlin")
    assert (comparison.preferred == "Paris") == (comparison.score_a < comparison.score_b)


def readme_example() -> str:
    readme = (PROJECT / "README.md").read_text()
    section = readme.split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_from_python_example_runs(tmp_path, monkeypatch):
    code = readme_example()
    assert '"smollm2-135m"' in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"smollm2-135m"', '"tiny-llama3"'), "README.md", "exec"), {})
    assert (tmp_path / "velloran.pt").is_file()


def test_example_edits_one_fact_and_reverts():
    example = runpy.run_path(str(PROJECT / "examples" / "edit_one_fact.py"))
    result = example["main"]("tiny-llama3", **FAST_EDITING)
    before, after, reverted = result["before"], result["after"], result["reverted"]
    assert after["comparison"].score_a < before["comparison"].score_a  # Lisbon became likelier
    assert reverted == before


def test_editor_keeps_earlier_keys_and_revert_takes_them_back():
    loaded = fresh("tiny-llama3")
    keep = {"mode": "sequential", "batch_size": 1, "n_edits": 2, "sequential.keep_edits": True}
    editor = Editor.from_pretrained(loaded, algorithm="memit", **keep, **FAST_EDITING)
    past = editor.past_keys[1]
    first = editor.edit(EXAMPLE_FACTS[0])
    gram = past.gram.clone()
    assert past.count == 1 and float(gram.norm()) > 0
    second = editor.edit(EXAMPLE_FACTS[1])
    assert past.count == 2
    second.revert()
    assert past.count == 1
    torch.testing.assert_close(past.gram, gram, rtol=1e-12, atol=1e-12 * float(gram.norm()))
    first.revert()
    assert past.count == 0 and float(past.gram.abs().max()) <= 1e-12 * float(gram.norm())
