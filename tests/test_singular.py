"""Singular edits at batch cost against the one-fact-at-a-time path.

- ``singular_updates`` (one C0 solve for all facts, rank one) equals each algorithm's closed
  form solved for one fact, and refuses what the closed forms refuse;
- the whole singular procedure (values and keys of all facts in batches, updates solved
  alone, one batched evaluation) equals edit -> evaluate -> restore per fact, ES/PS/NS scores
  within 1e-5 and the same GE texts, and leaves W untouched.
"""

from __future__ import annotations

import pytest
import torch

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
from editexp.row_edits import RowEdits

PREFIXES = ["", "The weather was nice today. "]
HPARAMS = ValueHparams(v_lr=0.5, v_steps=6)


def random_covariance(dim: int, seed: int = 0) -> CovarianceFactor:
    generator = torch.Generator().manual_seed(seed)
    samples = torch.randn(dim, 4 * dim, generator=generator, dtype=torch.float64)
    return CovarianceFactor(samples @ samples.T / samples.shape[1] + 0.1 * torch.eye(dim))


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
