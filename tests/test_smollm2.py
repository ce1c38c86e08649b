"""End to end on the real SmolLM2-135M (CPU): it knows facts, each algorithm rewrites one, and
the runner's modes raise efficacy while keeping the neighbourhood."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from editexp.config import run_settings
from editexp.editing.deltas import restore_weights, snapshot_weights
from editexp.editing.editor import edit_batch
from editexp.editing.keys import EditRequest
from editexp.editing.linalg import CovarianceFactor
from editexp.editing.plan import UpdatePlan
from editexp.editing.prefixes import context_prefixes
from editexp.evaluation.scoring import score_continuations
from editexp.layer_stats import load_or_compute_stats
from editexp.runner import run

pytestmark = pytest.mark.slow

STATS = ["stats.n_tokens=30000"]
DARRIEUX = EditRequest(0, "The mother tongue of {} is", "Danielle Darrieux", "English")


def test_greedy_completion_is_factual(smollm2):
    ids = smollm2.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    output = smollm2.model.generate(**ids, max_new_tokens=4, do_sample=False)
    completion = smollm2.tokenizer.decode(output[0, ids.input_ids.shape[1] :])
    assert "Paris" in completion


@pytest.mark.parametrize("algorithm", ["rome", "memit", "emmet"])
def test_each_algorithm_rewrites_the_mother_tongue(smollm2, algorithm):
    cfg = compose_config(*STATS, f"algorithm={algorithm}", "mode=singular")
    settings = run_settings(cfg)
    layer = settings.layers[0]
    stats = load_or_compute_stats(smollm2, [layer], cfg.stats, cfg.data, held_out_keys=0)
    covariance = {layer: CovarianceFactor(stats[layer].second_moment)}
    prefixes = context_prefixes(smollm2, **cfg.editing.prefixes)
    prompts = ["The mother tongue of Danielle Darrieux is"]
    (before,) = score_continuations(
        smollm2.model, smollm2.tokenizer, prompts, [["English", "French"]]
    )
    assert before[1] < before[0], "the unedited model should prefer French"
    snapshot = snapshot_weights(smollm2, [layer])
    try:
        edit_batch(
            smollm2,
            [DARRIEUX],
            UpdatePlan(algorithm, [layer], settings.lam, settings.hparams, progress=False),
            covariance,
            prefixes,
        )
        (after,) = score_continuations(
            smollm2.model, smollm2.tokenizer, prompts, [["English", "French"]]
        )
    finally:
        restore_weights(smollm2, snapshot)
    assert after[0] < after[1], f"{algorithm}: English should now be preferred ({after})"
    assert torch.equal(smollm2.edit_module(layer).weight, snapshot[layer])


RUN = [*STATS, "logger=none", "eval.generation_facts=0"]


def check_edit_worked(summary, min_es=80.0, max_ns_drop=15.0):
    pre, post = summary["pre"], summary["post"]
    assert post["ES"]["mean"] >= min_es
    assert post["ES"]["mean"] >= pre["ES"]["mean"] + 40
    assert post["NS"]["mean"] >= pre["NS"]["mean"] - max_ns_drop


def test_memit_batch_of_16_reaches_high_efficacy(tmp_path):
    summary = run(
        compose_config(*RUN, "algorithm=memit", "mode=batch", "n_edits=16"), tmp_path
    ).to_json()
    check_edit_worked(summary, min_es=85.0)


def test_emmet_batch(tmp_path):
    summary = run(
        compose_config(*RUN, "algorithm=emmet", "mode=batch", "n_edits=8", "lambda=0"), tmp_path
    ).to_json()
    check_edit_worked(summary)


def test_rome_singular(tmp_path):
    summary = run(
        compose_config(*RUN, "algorithm=rome", "mode=singular", "n_edits=3"), tmp_path
    ).to_json()
    check_edit_worked(summary)


def test_memit_sequential_with_generation(tmp_path):
    summary = run(
        compose_config(
            *STATS,
            "logger=none",
            "algorithm=memit",
            "mode=sequential",
            "n_edits=4",
            "batch_size=2",
            "eval.generation_facts=1",
            "eval.generation_length=40",
        ),
        tmp_path,
    ).to_json()
    check_edit_worked(summary)
    assert summary["post"]["GE"]["mean"] > 100
