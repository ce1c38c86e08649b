"""The run's inputs are checked before the model loads: config values, CounterFact files, prompt
lengths, case ids, the corpus and the statistics' token count, EMMET's exact constraints; each
refusal is one line on stderr with exit status 2.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cached_model, compose_config
from console_scripts import (
    COUNTERFACT,
    TINY,
    TWO_UPDATES,
    cli,
    editexp,
    error_line,
    read_jsonl,
    records,
    user_error,
    write_counterfact,
)

import editexp.cli as editexp_cli
from editexp.layer_stats import StatsError, load_or_compute_stats
from editexp.models import model_shape


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["layer=1.5"], "layer=1.5; expected an int or a list of ints"),
        (["layer=true"], "layer=True; expected an int or a list of ints"),
        (["layer=[1,x]"], "layer=[1, 'x']; expected an int or a list of ints"),
        (["n_edits=2.0"], "n_edits=2.0; expected a positive integer"),
        (["editing.batch_size=0"], "editing.batch_size=0; expected a positive integer"),
        (["eval.batch_size=0"], "eval.batch_size=0; expected a positive integer"),
        (
            ["eval.generation_batch_size=-2"],
            "eval.generation_batch_size=-2; expected a positive integer",
        ),
        (["editing.cache=no"], "editing.cache='no'; expected true or false"),
        (["eval.layer_states_gb=abc"], "eval.layer_states_gb='abc'; expected a finite number >= 0"),
        (["eval.generation_facts=-1"], "eval.generation_facts=-1; expected a number of facts"),
        (["stats.n_tokens=abc"], "stats.n_tokens='abc'; expected a positive integer"),
        (["+stats.dtype=float32"], "'stats.dtype' (it was replaced by precision=32-true|bf16"),
        (["precision=16-mixed"], "precision='16-mixed'; expected one of 64-true, 32-true, bf16"),
        (["seed=abc"], "seed='abc'; expected an integer"),
        (["device=foo"], "device='foo'; expected auto, cpu, cuda"),
        (["lambda=true"], "lambda=True; expected a float >= 0"),
        (["force=maybe"], "force='maybe'; expected true or false"),
        (["model.hparams.memit.v_lr=-1"], "model.hparams.memit.v_lr=-1; expected a finite"),
        (["data.case_ids=[3,3]"], "data.case_ids repeats [3]"),
        (["data.case_ids=[1,x]"], "data.case_ids has 'x'; expected a list of integer"),
        (["data.case_ids=[3]", "data.order=file"], "data.case_ids implies data.order=case_ids"),
        (["data.order=case_ids", "data.case_ids=[3,999999]"], "not in the data set: [999999]"),
        (["data.split=train"], "data.split='train'; expected one of ('all', 'tuning'"),
        (["data.fact_set=5000"], "x 5001 fact sets (data.fact_set=5000)"),
        (["data.fact_set=x"], "data.fact_set='x'; expected an integer >= 0"),
        (["data.case_ids=[70,6698]"], "an earlier listed fact already has: case_ids [6698]"),
        (["model=nonexistent"], "Could not find 'model/nonexistent' Available options"),
        (["mode=sequential", "batch_size=3"], "mode=sequential needs n_edits divisible"),
    ],
)
def test_config_errors_are_one_line_before_the_model_loads(tmp_path, no_model, overrides, says):
    args = [*TWO_UPDATES, *overrides]
    line = user_error(editexp(tmp_path / "run", *args))
    assert says in line
    assert not (tmp_path / "run" / "run.json").exists()


def test_the_message_names_the_grid_point_in_a_multirun(tmp_path, no_model):
    result = cli(
        editexp_cli.main,
        "-m",
        *TINY,
        *TWO_UPDATES,
        "layer=1.5",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    line = error_line(result)  # every point is checked before the first one starts
    assert "1 of 1 grid points would fail" in line and "#0 (" in line
    assert "layer=1.5; expected an int" in line


def bad_records(tmp_path: Path, change) -> Path:
    data = records(20)
    change(data)
    return write_counterfact(tmp_path / "bad.json", data)


def rewrite_prompt(index: int, prompt: str):
    def change(data):
        data[index]["requested_rewrite"]["prompt"] = prompt

    return change


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: d.write_text(COUNTERFACT.read_text()[:5000]), "is not valid JSON (Unterminated"),
        (lambda d: d.write_bytes(b"\xff\xfe\x00binary"), "is not UTF-8 text"),
        (lambda d: d.write_text('{"case_id": 0}'), "expected a JSON list of CounterFact records"),
        (lambda d: bad_records(d.parent, rewrite_prompt(3, "{} and {} is in")), "exactly one '{}'"),
        (lambda d: bad_records(d.parent, rewrite_prompt(3, "{x} is located in")), "exactly one"),
        (lambda d: bad_records(d.parent, rewrite_prompt(3, "{}'s {0} is")), "no other brace"),
        (lambda d: bad_records(d.parent, lambda r: r[2].pop("requested_rewrite")), "missing field"),
        (lambda d: bad_records(d.parent, lambda r: r[4].update(case_id=r[5]["case_id"])), "twice"),
        (lambda d: bad_records(d.parent, lambda r: r[1].update(case_id="7")), "must be an integer"),
    ],
)
def test_bad_counterfact_files_are_one_line_naming_the_file(tmp_path, no_model, make, says):
    path = tmp_path / "bad.json"
    make(path)
    line = user_error(editexp(tmp_path / "run", *TWO_UPDATES, f"data.counterfact={path}"))
    assert str(path) in line and says in line


def test_a_prompt_longer_than_the_model_is_refused_naming_its_case(tmp_path, cache_dir, no_model):
    data = records(4)
    data[0]["requested_rewrite"]["prompt"] = "{} " + "went on and on " * 200 + "to"
    path = write_counterfact(tmp_path / "long.json", data)
    args = [*TWO_UPDATES, f"data.counterfact={path}", "data.order=file"]
    line = user_error(editexp(tmp_path / "run", *args))
    case_id = data[0]["case_id"]
    assert f"case_id={case_id}" in line and "more than the model's 512 positions" in line
    assert not (cache_dir / "stats").exists()  # before the model loads, so before any statistics


def test_data_case_ids_implies_their_order(tmp_path, finished, monkeypatch):
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(finished[1], tmp_path / "cache")
    wanted = [records(40)[i]["case_id"] for i in (7, 3)]
    result = editexp(tmp_path / "run", *TWO_UPDATES, f"data.case_ids=[{wanted[0]},{wanted[1]}]")
    assert result.code == 0, result.err
    assert [row["case_id"] for row in read_jsonl(tmp_path / "run" / "facts.jsonl")] == wanted


def test_no_network_and_no_data_dir_says_to_set_data_dir(tmp_path, cache_dir, no_model):
    args = [*TWO_UPDATES, "data.dir=null", "data.download_url=http://editexp.invalid/cf.json"]
    line = user_error(editexp(tmp_path / "run", *args))
    assert "no CounterFact data: downloading http://editexp.invalid/cf.json failed" in line
    assert "no network?" in line and "set data.dir to a folder" in line
    assert not (cache_dir / "data").exists()


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"\x00\x01\x02 binary \x00" * 100, "holds NUL bytes"), (b"\xff\xfeabc", "is not UTF-8 text")],
)
def test_a_binary_corpus_is_refused_before_the_model_loads(tmp_path, no_model, content, says):
    corpus = tmp_path / "corpus.bin"
    corpus.write_bytes(content)
    line = user_error(editexp(tmp_path / "run", *TWO_UPDATES, f"stats.corpus.files=[{corpus}]"))
    assert f"statistics corpus file {corpus} is not usable: it {says}" in line


def test_a_corpus_shorter_than_d_k_is_refused_before_the_model_loads(tmp_path, cache_dir, no_model):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("Five tokens or so.\n")
    line = user_error(editexp(tmp_path / "run", *TWO_UPDATES, f"stats.corpus.files=[{corpus}]"))
    assert re.search(r"tiny.txt\) holds \d tokens, fewer than d_k=128, so C0 would be", line)
    assert not (cache_dir / "stats").exists()


def test_statistics_refuse_a_corpus_shorter_than_d_k_and_cache_nothing(
    tiny_llama3, tmp_path, cache_dir
):
    """The check the statistics themselves make (for a datasets corpus, counted only as it is
    read): a singular C0 is an error, never a cache entry."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("Five tokens or so.\n")
    cfg = compose_config(
        "model=tiny-llama3", f"stats.corpus.files=[{corpus}]", "stats.n_tokens=300"
    )
    with pytest.raises(StatsError, match=r"gave \d tokens, fewer than d_k=128 at layer 1"):
        load_or_compute_stats(tiny_llama3, [1], cfg.stats, cfg.data, held_out_keys=0)
    assert not list((cache_dir / "stats").rglob("*.pt"))


def test_n_tokens_below_d_k_is_refused_before_the_model_loads(tmp_path, cache_dir, no_model):
    line = user_error(editexp(tmp_path / "run", *TWO_UPDATES, "stats.n_tokens=100"))
    assert "stats.n_tokens=100 is less than d_k=128" in line
    assert not (cache_dir / "stats").exists()


def test_emmet_lambda_0_refuses_a_batch_of_d_k_facts_before_the_model_loads(
    tmp_path, cache_dir, no_model
):
    args = ["algorithm=emmet", "lambda=0", "mode=batch", "n_edits=128"]
    line = user_error(editexp(tmp_path / "run", *args))
    assert "EMMET with lambda=0 needs fewer than d_k=128 facts per update" in line
    assert "lambda > 0" in line and not (cache_dir / "stats").exists()


def test_emmet_lambda_0_warns_above_condition_1e8_and_refuses_e_equal_d_k(caplog):
    from editexp.editing.emmet import emmet_delta
    from editexp.editing.linalg import CovarianceFactor, EditingError

    generator = torch.Generator().manual_seed(0)
    d_k = 16
    covariance = CovarianceFactor(torch.eye(d_k, dtype=torch.float64))
    keys = torch.randn(d_k, 4, generator=generator, dtype=torch.float64)
    residuals = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    for spread, warns in ((1e-2, False), (1e-4, True)):  # cond about 1e5 and 1e9
        near = keys[:, :1] + spread * torch.randn(d_k, 1, generator=generator, dtype=torch.float64)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="editexp.editing.emmet"):
            emmet_delta(torch.cat([keys, near], 1), residuals, covariance, 0.0)
        assert ("consider lambda > 0" in caplog.text) == warns
    square = torch.randn(d_k, d_k, generator=generator, dtype=torch.float64)
    with pytest.raises(EditingError, match=r"fewer than d_k=16 facts per batch, got E=16"):
        emmet_delta(square, torch.randn(8, d_k, dtype=torch.float64), covariance, 0.0)


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-gpt2", "smollm2-135m"])
def test_the_shape_checked_before_loading_is_the_loaded_models(name):
    """d_k and the context length read from the config (modules built on the meta device)
    are the loaded model's: the checks before loading see the model that then runs."""
    loaded = cached_model(name)
    model_cfg = compose_config(f"model={name}").model
    for layer in (0, model_cfg.n_layers - 1):
        shape = model_shape(model_cfg, layer)
        assert shape.d_k == loaded.weight(layer).shape[1]
        config = loaded.model.config
        positions = getattr(config, "max_position_embeddings", None)
        assert shape.positions == (positions or config.n_positions) > 0
        text = "The Eiffel Tower is in"
        assert shape.tokenizer(text).input_ids == loaded.tokenizer(text).input_ids
