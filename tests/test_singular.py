"""Singular edits at batch cost against the one-fact-at-a-time path.

- ``singular_updates`` (one C0 solve for all facts, rank one) equals each algorithm's closed
  form solved for one fact;
- ``RowEdits`` (each batch row carries its own fact's update) scores and samples exactly what
  the model with that update written into W gives;
- the whole singular procedure (values and keys of all facts in batches, updates solved
  alone, one batched evaluation) equals edit -> evaluate -> restore per fact, ES/PS/NS scores
  within 1e-5 and the same GE texts, and leaves W untouched.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config

from editexp.config import ValueHparams
from editexp.editing.deltas import restore_weights, snapshot_weights
from editexp.editing.editor import edit_batch
from editexp.editing.keys import EditRequest
from editexp.editing.linalg import CovarianceFactor, EditingError, SolveParams
from editexp.editing.plan import UpdatePlan
from editexp.editing.rank_one import singular_updates
from editexp.editing.singular import solve_singular
from editexp.editing.solvers import closed_form_delta
from editexp.evaluation.counterfact_eval import evaluate_facts
from editexp.evaluation.scoring import ScoringShortcuts, score_continuations
from editexp.row_edits import PromptEdits, RankOneEdits, RowEdits
from editexp.sampling import generation_seed, sample_continuation_ids, top_k_pick

PROMPTS = [
    "The capital of France is",
    "Hi",
    "Autonomous University of Madrid, which is located in",
    "Danielle Darrieux's mother tongue is",
    "and Sallie Beavers Riley. Autonomous University of Madrid is located in",
]
TARGETS = [
    ["Paris", "Berlin"],
    ["there", "Xylophone orchestra of the north"],
    ["Sweden", "Spain"],
    ["English", "French", "Old Church Slavonic"],
    ["the Kingdom of Sweden", "Spain"],
]
PROMPT_EDITS = [0, 1, 2, -1, 1]  # prompt 3 unedited, prompts 1 and 4 share edit 1
PREFIXES = ["", "The weather was nice today. "]
HPARAMS = ValueHparams(v_lr=0.5, v_steps=6)


def random_covariance(dim: int, seed: int = 0) -> CovarianceFactor:
    generator = torch.Generator().manual_seed(seed)
    samples = torch.randn(dim, 4 * dim, generator=generator, dtype=torch.float64)
    return CovarianceFactor(samples @ samples.T / samples.shape[1] + 0.1 * torch.eye(dim))


def random_edits(loaded, layer: int, n: int, scale: float = 0.3) -> RankOneEdits:
    generator = torch.Generator().manual_seed(1)
    d_v, d_k = loaded.weight(layer).shape
    left = torch.randn(n, d_v, generator=generator)
    return RankOneEdits(layer, left, scale * torch.randn(n, d_k, generator=generator))


def with_written_edit(loaded, edits: RankOneEdits, index: int, run):
    """``run()`` on the model with edit ``index`` written into W (-1: unedited), restored."""
    snapshot = snapshot_weights(loaded, [edits.layer])
    try:
        if index >= 0:
            weight = loaded.weight(edits.layer)
            with torch.no_grad():
                weight += edits.delta(index).to(weight.dtype)
        return run()
    finally:
        restore_weights(loaded, snapshot)


# --- the rank-one updates ----------------------------------------------------------------


@pytest.mark.parametrize(
    "algorithm, lam",
    [("rome", None), ("memit", 100.0), ("emmet", 0.0), ("emmet", 1e-3), ("alphaedit", 1.0)],
)
def test_singular_updates_equal_each_closed_form_alone(algorithm, lam):
    d_k, d_v, n = 24, 10, 5
    covariance = random_covariance(d_k)
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(d_k, n, generator=generator, dtype=torch.float64)
    residuals = torch.randn(d_v, n, generator=generator, dtype=torch.float64)
    threshold = 0.5 if algorithm == "alphaedit" else None  # some of C0's eigenvalues
    edits = singular_updates(
        algorithm, 3, keys, residuals, covariance, SolveParams(lam, nullspace_threshold=threshold)
    )
    assert edits.layer == 3 and len(edits) == n
    for i in range(n):
        alone = closed_form_delta(
            algorithm,
            keys[:, i : i + 1],
            residuals[:, i : i + 1],
            covariance,
            SolveParams(lam, nullspace_threshold=threshold),
        )
        torch.testing.assert_close(edits.delta(i).double(), alone, rtol=1e-5, atol=1e-7)
    if algorithm == "rome" or lam == 0.0:  # equality constraint: (W + Delta) k = v exactly
        for i in range(n):
            torch.testing.assert_close(
                edits.delta(i).double() @ keys[:, i], residuals[:, i], rtol=1e-5, atol=1e-5
            )


def test_singular_updates_refuse_what_the_closed_forms_refuse():
    covariance = random_covariance(8)
    keys, residuals = torch.randn(8, 2), torch.randn(4, 2)
    with pytest.raises(EditingError, match="lambda=0"):
        singular_updates("memit", 1, keys, residuals, covariance, SolveParams(0.0))
    with pytest.raises(EditingError, match="null"):
        singular_updates("emmet", 1, keys, residuals, covariance, SolveParams(None))
    with pytest.raises(EditingError, match="algorithm"):
        singular_updates("ft", 1, keys, residuals, covariance, SolveParams(1.0))
    keys[:, 1] = 0.0  # a zero key: k^T C0^-1 k = 0
    with pytest.raises(EditingError, match=r"facts \[1\]"):
        singular_updates("rome", 1, keys, residuals, covariance, SolveParams(None))


# --- per-row application -------------------------------------------------------------------


def test_row_edits_score_as_written_weights(tiny):
    edits = random_edits(tiny, 1, 3)
    rows = RowEdits.for_model(tiny, edits)
    batched = score_continuations(
        tiny.model,
        tiny.tokenizer,
        PROMPTS,
        TARGETS,
        batch_size=2,
        shortcuts=ScoringShortcuts(edits=PromptEdits(rows, PROMPT_EDITS)),
    )
    for prompt, targets, index, scores in zip(PROMPTS, TARGETS, PROMPT_EDITS, batched):
        alone = with_written_edit(
            tiny,
            edits,
            index,
            lambda p=prompt, t=targets: score_continuations(tiny.model, tiny.tokenizer, [p], [t]),
        )[0]
        assert max(abs(a - b) for a, b in zip(scores, alone)) < 1e-5
    # negative control: the edits change the scores, and a wrong row mapping is caught
    plain = score_continuations(tiny.model, tiny.tokenizer, PROMPTS, TARGETS)
    assert max(abs(a - b) for x, y in zip(plain, batched) for a, b in zip(x, y)) > 1e-2
    shifted_rows = ScoringShortcuts(edits=PromptEdits(rows, [1, 2, 0, -1, 0]))
    shifted = score_continuations(
        tiny.model, tiny.tokenizer, PROMPTS, TARGETS, shortcuts=shifted_rows
    )
    assert max(abs(a - b) for x, y in zip(shifted, batched) for a, b in zip(x, y)) > 1e-3


def test_row_edits_sample_as_written_weights(tiny):
    edits = random_edits(tiny, 1, 3)
    seeds = [generation_seed(0, 11, i) for i in range(len(PROMPTS))]
    for top_k in (1, 5):  # greedy is exact whatever the rounding; top-5 uses the same draws
        batched = sample_continuation_ids(
            tiny.model,
            tiny.tokenizer,
            PROMPTS,
            24,
            top_k,
            seeds,
            batch_size=3,
            edits=PromptEdits(RowEdits.for_model(tiny, edits), PROMPT_EDITS),
        )
        for prompt, seed, index, ids in zip(PROMPTS, seeds, PROMPT_EDITS, batched):
            alone = with_written_edit(
                tiny,
                edits,
                index,
                lambda p=prompt, s=seed, k=top_k: sample_continuation_ids(
                    tiny.model, tiny.tokenizer, [p], 24, k, [s]
                ),
            )[0]
            assert ids == alone


def test_row_edits_check_their_rows(tiny):
    rows = RowEdits.for_model(tiny, random_edits(tiny, 1, 2))
    with pytest.raises(IndexError):
        rows.select([0, 2])
    with pytest.raises(ValueError, match="1 prompt edits for 5 prompts"):
        shortcuts = ScoringShortcuts(edits=PromptEdits(rows, [0]))
        score_continuations(tiny.model, tiny.tokenizer, PROMPTS, TARGETS, shortcuts=shortcuts)
    with rows.installed(), pytest.raises(RuntimeError, match="one edit index per batch row"):
        rows.select([0])
        tiny.model(input_ids=torch.tensor([[1, 2], [3, 4]]))


# --- seeded sampling ---------------------------------------------------------------------


def test_top_k_pick_is_the_inverse_cdf_of_the_top_k_softmax():
    probabilities = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])  # top 3: 1 (.5), 3 (.3), 2 (.1)
    logits = probabilities.log().expand(6, -1)
    draws = torch.tensor([0.0, 0.55, 0.56, 0.8, 0.9, 0.999])  # x (0.9 total): cut at .5, .8
    picked = top_k_pick(logits, draws, top_k=3)
    assert picked.tolist() == [1, 1, 3, 3, 2, 2]
    assert top_k_pick(logits, torch.rand(6), top_k=1).tolist() == [1] * 6


def test_a_prompt_samples_the_same_alone_or_in_any_batch(tiny):
    seeds = [generation_seed(3, 100 + i, i) for i in range(len(PROMPTS))]
    together = sample_continuation_ids(tiny.model, tiny.tokenizer, PROMPTS, 30, 5, seeds, 64)
    in_pairs = sample_continuation_ids(tiny.model, tiny.tokenizer, PROMPTS, 30, 5, seeds, 2)
    reversed_order = sample_continuation_ids(
        tiny.model, tiny.tokenizer, PROMPTS[::-1], 30, 5, seeds[::-1], 3
    )
    alone = [
        sample_continuation_ids(tiny.model, tiny.tokenizer, [p], 30, 5, [s])[0]
        for p, s in zip(PROMPTS, seeds)
    ]
    assert together == in_pairs == reversed_order[::-1] == alone
    other = sample_continuation_ids(
        tiny.model, tiny.tokenizer, PROMPTS, 30, 5, [s + 1 for s in seeds], 64
    )
    assert other != together
    assert generation_seed(0, 1, 2) != generation_seed(0, 2, 1) != generation_seed(1, 1, 2)


def test_generation_batch_size_from_the_config_changes_no_text(
    tiny, counterfact_facts, monkeypatch
):
    """``eval.generation_batch_size`` reaches the sampler and changes only the speed."""
    import editexp.evaluation.counterfact_eval as counterfact_eval
    from editexp.evaluation.evaluator import Evaluator

    sampler_batch_sizes = []

    def spy(*args, batch_size, **kwargs):
        sampler_batch_sizes.append(batch_size)
        return generate_texts(*args, batch_size=batch_size, **kwargs)

    generate_texts = counterfact_eval.generate_texts
    monkeypatch.setattr(counterfact_eval, "generate_texts", spy)
    chosen = counterfact_facts[:3]
    results = {}
    for size in (1, 4, 256):
        cfg = compose_config("eval.generation_length=16", f"eval.generation_batch_size={size}")
        scored = Evaluator.from_config(tiny, cfg).score(
            chosen, generate_for={fact.case_id for fact in chosen}
        )
        results[size] = [(fact.generation_texts, fact.GE) for fact in scored]
    assert sampler_batch_sizes == [1, 4, 256]
    assert all(texts for texts, _ in results[1])
    assert results[1] == results[4] == results[256]


# --- the whole singular procedure ----------------------------------------------------------


@pytest.mark.parametrize("algorithm, lam", [("rome", None), ("memit", 1.0)])
def test_singular_procedure_equals_one_fact_at_a_time(model64, counterfact_facts, algorithm, lam):
    layer = 1
    covariance = random_covariance(model64.weight(layer).shape[1])
    requests = [
        EditRequest(f.case_id, f.prompt, f.subject, f.target_new) for f in counterfact_facts
    ]
    evaluate = dict(generation_length=20, seed=0, progress=False)

    snapshot = snapshot_weights(model64, [layer])
    one_at_a_time, written_deltas = [], []
    for request, fact in zip(requests, counterfact_facts):
        update = edit_batch(
            model64,
            [request],
            UpdatePlan(algorithm, [layer], lam, HPARAMS, batch_size=1, progress=False),
            {layer: covariance},
            PREFIXES,
        )
        written_deltas.append(update.deltas[layer])
        (scores,) = evaluate_facts(
            model64.model, model64.tokenizer, [fact], generation_facts=1, **evaluate
        )
        one_at_a_time.append(scores)
        restore_weights(model64, snapshot)

    singular = solve_singular(
        model64,
        requests,
        UpdatePlan(algorithm, (layer,), lam, HPARAMS, batch_size=8, progress=False),
        covariance,
        PREFIXES,
    )
    together = evaluate_facts(
        model64.model,
        model64.tokenizer,
        counterfact_facts,
        generation_facts=len(counterfact_facts),
        edits=RowEdits.for_model(model64, singular.edits),
        **evaluate,
    )
    assert torch.equal(model64.edit_module(layer).weight, snapshot[layer])  # W never written
    for i, (alone, batched) in enumerate(zip(one_at_a_time, together)):
        torch.testing.assert_close(
            singular.edits.delta(i).double(), written_deltas[i].double(), rtol=1e-4, atol=1e-6
        )
        assert alone.case_id == batched.case_id
        for family, pairs in alone.scores.items():
            differences = [
                abs(a - b) for p, q in zip(pairs, batched.scores[family]) for a, b in zip(p, q)
            ]
            assert max(differences) < 1e-5, (family, max(differences))
        assert alone.generation_texts == batched.generation_texts
        assert alone.GE == pytest.approx(batched.GE)
    # negative control: the edits did something
    unedited = evaluate_facts(model64.model, model64.tokenizer, counterfact_facts, progress=False)
    assert any(
        abs(a.scores["rewrite"][0][0] - b.scores["rewrite"][0][0]) > 1e-3
        for a, b in zip(unedited, together)
    )
