"""Metric providers: the held-out perplexity against a hand computation, and a toy provider
registered here that reaches the record, W&B and the report without touching them."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, compose_config
from wandb_offline import read_run

from editexp import metric_specs
from editexp.data.counterfact import Fact
from editexp.evaluation import providers
from editexp.evaluation.counterfact_eval import FactScores
from editexp.evaluation.evaluator import Evaluator
from editexp.evaluation.providers.perplexity import (
    HeldOutPerplexity,
    first_window,
    held_out_perplexity,
)
from editexp.metric_specs import MetricSpec, headline_metrics, spec
from editexp.models import LoadedModel

# --------------------------------------------------------------------------- metric specs


def test_specs_format_label_and_order() -> None:
    es = spec("ES")
    assert es.label == "efficacy score ES (%)" and es.higher_is_better
    assert es.format(94.5, 3.25) == "94.50 (3.25)" and es.format(None) == ""
    assert spec("PPL").higher_is_better is False  # registered by its provider module
    # CounterFact's always, others only when present; magnitudes are not headline metrics
    assert headline_metrics() == ("ES", "PS", "NS", "S", "GE")
    assert headline_metrics(["ES_magnitude", "PPL", "NEW"]) == (
        "ES",
        "PS",
        "NS",
        "S",
        "GE",
        "PPL",
        "NEW",
    )
    assert spec("NEW").label == "NEW NEW"  # registered nowhere: a plain label


def test_fact_scores_keep_provider_values_through_json() -> None:
    scores = FactScores(7, {"rewrite": [(1.0, 2.0)]}, GE=5.0, extra={"TOYF": 0.25})
    row = scores.to_json()
    assert row["TOYF"] == 0.25 and row["ES"] == 1.0
    assert FactScores.from_json(row) == scores
    assert "TOYF" not in FactScores(7, {"rewrite": [(1.0, 2.0)]}).to_json()


# --------------------------------------------------------------------------- perplexity


def test_held_out_text_starts_after_c0_and_the_held_out_keys() -> None:
    from editexp.layer_stats import HELD_OUT_STRIDE

    for stats_tokens, seq_len, keys in [(3000, 64, 32), (100_000, 256, 256), (5, 2, 0)]:
        for text_len in (seq_len - 1, seq_len):  # with a BOS per window, without
            c0_text = math.ceil(stats_tokens / seq_len) * text_len  # C0's windows
            start = first_window(stats_tokens, seq_len, keys) * text_len
            assert start >= c0_text + keys * HELD_OUT_STRIDE


def _perplexity_provider(n_tokens: int = 300) -> HeldOutPerplexity:
    cfg = compose_config(
        *TINY_RUN, f"+eval.perplexity.n_tokens={n_tokens}", "+eval.perplexity.batch_size=2"
    )
    return held_out_perplexity(cfg)


def test_perplexity_is_exp_of_the_mean_nll_over_the_budget(tiny_llama3: LoadedModel) -> None:
    ppl = _perplexity_provider(n_tokens=300)
    windows = ppl.windows(tiny_llama3)
    assert sum(len(window) for window in windows) == 300  # the budget, exactly
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for window in windows:  # one window at a time, no padding
            ids = torch.tensor([window])
            logits = tiny_llama3.model(input_ids=ids).logits[0]  # (T, V)
            nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
            nll_sum += float(nll)
            count += len(window) - 1
    assert ppl.score(tiny_llama3)["PPL"] == pytest.approx(math.exp(nll_sum / count), rel=1e-5)


def test_perplexity_moves_with_an_edit_and_not_with_a_no_op(tiny_llama3: LoadedModel) -> None:
    ppl = _perplexity_provider(n_tokens=200)
    before = ppl.score(tiny_llama3)["PPL"]
    weight = tiny_llama3.weight(1)  # (d_v, d_k)
    saved = weight.detach().clone()
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            weight.add_(torch.zeros_like(weight))
            assert ppl.score(tiny_llama3)["PPL"] == before
            u = torch.randn(weight.shape[0], 1, generator=generator)
            v = torch.randn(1, weight.shape[1], generator=generator)
            weight.add_(u @ v)  # a rank-one edit
            assert abs(ppl.score(tiny_llama3)["PPL"] - before) > 1e-3 * before
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert ppl.score(tiny_llama3)["PPL"] == before


def test_pre_edit_model_metrics_are_cached_under_the_settings(
    tiny_llama3: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path))
    evaluator = Evaluator(tiny_llama3, providers=[_perplexity_provider(200)])
    first = evaluator.pre_edit_model()
    assert list((tmp_path / "pre_edit_model").glob("*.json"))
    assert Evaluator(tiny_llama3, providers=[_perplexity_provider(200)]).pre_edit_model() == first
    other = Evaluator(tiny_llama3, providers=[_perplexity_provider(250)]).pre_edit_model()
    assert other != first and len(list((tmp_path / "pre_edit_model").glob("*.json"))) == 2


def test_unknown_provider_is_one_clear_error() -> None:
    cfg = compose_config(*TINY_RUN, "+eval.metrics=[nonesuch]")
    with pytest.raises(providers.MetricConfigError, match="nonesuch"):
        providers.providers_from_config(cfg)


# --------------------------------------------------------------------------- a toy provider


class WeightNorm(providers.ModelMetricProvider):
    """A toy model-level metric: the Frobenius norm of layer 1's edited weight."""

    specs = (MetricSpec("WNORM", "edited weight norm", "", higher_is_better=False),)

    def cache_key(self) -> list[str]:
        return ["toy weight norm"]

    def score(self, model: LoadedModel) -> dict[str, float]:
        return {"WNORM": float(model.weight(1).norm())}


class PromptLength(providers.FactMetricProvider):
    """A toy per-fact metric: characters of the rewrite prompt."""

    specs = (MetricSpec("PLEN", "prompt length", "chars", higher_is_better=True),)

    def cache_key(self) -> list[str]:
        return ["toy prompt length"]

    def score_facts(self, model: LoadedModel, facts: Sequence[Fact]) -> list[dict[str, float]]:
        return [{"PLEN": float(len(fact.rewrite_prompt))} for fact in facts]


@pytest.fixture
def toy_providers():
    for toy in (WeightNorm, PromptLength):
        metric_specs.register(toy.specs[0])
    providers.provider("toy_norm")(lambda cfg: WeightNorm())
    providers.provider("toy_length")(lambda cfg: PromptLength())
    yield
    for name in ("toy_norm", "toy_length"):
        providers.unregister(name)
    for name in ("WNORM", "PLEN"):
        metric_specs.unregister(name)


def test_a_registered_provider_reaches_record_wandb_and_report(
    toy_providers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from editexp.report import main as report_main
    from editexp.runner import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    sweep = tmp_path / "multirun" / "s1"
    overrides = [
        "mode=sequential",
        "n_edits=4",
        "batch_size=2",
        "+eval.metrics=[toy_norm,toy_length]",
    ]
    cfg = compose_config(*TINY_RUN, "logger=wandb", "logger.project=editexp-test", *overrides)
    record = run(cfg, sweep / "0", overrides, str(sweep), None)

    assert record.pre["PLEN"]["n"] == 4 and record.post["PLEN"]["n"] == 4  # per fact
    assert record.post["WNORM"]["mean"] != record.pre["WNORM"]["mean"]  # the model was edited
    assert "WNORM" in record.table() and "PLEN" in record.table()
    batches = [
        json.loads(line) for line in (sweep / "0" / "batches.jsonl").read_text().splitlines()
    ]
    assert [set(b["metrics"]) >= {"WNORM", "PLEN"} for b in batches] == [True, True]
    assert batches[-1]["edited_so_far"]["WNORM"] == record.post["WNORM"]  # the curve's last point

    logged = read_run(sweep / "0")
    assert logged["summary"]["WNORM"] == pytest.approx(record.post["WNORM"]["mean"])
    assert logged["summary"]["pre/PLEN/mean"] == pytest.approx(record.pre["PLEN"]["mean"])
    history = [row for row in logged["history"] if "edits_done" in row]
    assert [row["edited_so_far/WNORM"] for row in history] == pytest.approx(
        [b["edited_so_far"]["WNORM"]["mean"] for b in batches]
    )

    assert report_main([str(sweep)]) == 0
    with (sweep / "report" / "results.csv").open() as file:
        (row,) = list(csv.DictReader(file))
    assert float(row["post_WNORM_mean"]) == pytest.approx(record.post["WNORM"]["mean"])
    markdown = (sweep / "report" / "results.md").read_text()
    assert "| GE | WNORM | PLEN | Run |" in markdown
    assert "WNORM: edited weight norm" in markdown
    assert list((sweep / "report").glob("sequential.png"))
