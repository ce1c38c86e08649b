"""Names built from overrides and model names (editexp/paths.py): one short component inside its
folder, the same for the same text, so a long override list runs, and runs again, in the same
directory.
"""

from __future__ import annotations

import dataclasses

from conftest import TINY_RUN, cached_model
from console_scripts import (
    cli,
    editexp_here,
    user_error,
)

import editexp.cli as editexp_cli
from editexp.editing.prefixes import context_prefixes
from editexp.paths import NAME_LIMIT, dir_name, safe_name
from editexp.resolvers import sweep_name


def test_a_case_ids_path_does_not_move_the_run_directory_out_of_outputs(work, tmp_path, no_model):
    escape = "../" * 6 + "x.txt"
    user_error(editexp_here("data.order=case_ids", f"data.case_ids={escape}"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["work"]
    assert list(work.iterdir()) == []  # refused: it left nothing, inside outputs/ or out of it


def test_a_model_name_does_not_move_prefix_files_out_of_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "a" / "b" / "cache"
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(cache))
    loaded = cached_model("tiny-llama3")
    renamed = dataclasses.replace(loaded, spec=dataclasses.replace(loaded.spec, name="../../x"))
    context_prefixes(renamed, count=1, length=4, seed=0)
    assert [path.name for path in (tmp_path / "a" / "b").iterdir()] == ["cache"]
    assert [path.parent for path in cache.rglob("*.json")] == [cache / "prefixes"]


def test_names_are_one_short_component_and_the_same_for_the_same_text():
    assert safe_name("../../x") == ".._.._x" and safe_name("..") == "_.."
    assert dir_name("layer=[4,5],lambda=10") == "layer=[4,5],lambda=10"
    assert dir_name("data.case_ids=../../x.txt") == "data.case_ids=.._.._x.txt"
    assert dir_name("..") == "_.."
    long = ",".join(f"model.hparams.memit.v_steps={n}" for n in range(20))
    assert len(dir_name(long)) <= NAME_LIMIT and dir_name(long).startswith(long[:60])
    assert dir_name(long) == dir_name(long) != dir_name(long + "0")
    assert sweep_name(["logger=none", "+experiment=layer_search", "layer=0,1"]) == "layer=0,1"
    assert sweep_name([]) == "default"


def test_a_long_override_list_runs_and_runs_again_in_the_same_directory(work, monkeypatch):
    """The test suite's own tiny-model list without hydra.run.dir: the default directory name
    is short, and the same overrides find it again (the second run skips)."""
    overrides = [*TINY_RUN, "logger=none", "n_edits=1", "eval.generation_facts=0"]
    first = cli(editexp_cli.main, *overrides)
    assert first.code == 0, first.err
    (summary,) = work.glob("outputs/*/*/*/summary.json")
    assert len(summary.parent.name) <= NAME_LIMIT
    second = cli(editexp_cli.main, *overrides)
    assert second.code == 0, second.err
    assert f"{summary} exists; skipping" in second.out + second.err
    assert list(work.glob("outputs/*/*/*/summary.json")) == [summary]
