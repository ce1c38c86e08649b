import math

import numpy as np
import pytest

from editexp.evaluation.metrics import (
    FAMILIES,
    aggregate,
    fact_metrics,
    generation_entropy,
    harmonic_mean,
    harmonic_mean_se,
    ngram_entropy,
    word_tokens,
)


def _fact(n_neighborhood_flipped: int = 0) -> dict[str, list[tuple[float, float]]]:
    """New target preferred on rewrite/paraphrases; true target kept on 10 neighbours,
    except the first ``n_neighborhood_flipped`` which now prefer the new target."""
    neighborhood = [(2.0, 1.0)] * 10
    for i in range(n_neighborhood_flipped):
        neighborhood[i] = (0.5, 1.0)
    return {
        "rewrite": [(0.1, 3.0)],
        "paraphrase": [(0.2, 2.0), (0.3, 2.5)],
        "neighborhood": neighborhood,
    }


def test_families_constant():
    assert FAMILIES == ("rewrite", "paraphrase", "neighborhood")


def test_new_target_preferred_everywhere_gives_full_success():
    metrics = fact_metrics(_fact())
    assert metrics["ES"] == 1.0
    assert metrics["PS"] == 1.0
    assert metrics["NS"] == 1.0
    summary = aggregate([metrics])
    assert summary["ES"]["mean"] == 100.0
    assert summary["PS"]["mean"] == 100.0


def test_one_flipped_neighbour_costs_exactly_ten_points():
    before = aggregate([fact_metrics(_fact(0))])["NS"]["mean"]
    after = aggregate([fact_metrics(_fact(1))])["NS"]["mean"]
    assert before - after == pytest.approx(10.0)


def test_ties_and_partial_success():
    metrics = fact_metrics({"paraphrase": [(1.0, 1.0), (0.5, 1.0)], "neighborhood": [(1.0, 1.0)]})
    assert metrics["PS"] == 0.5  # the tie is a failure
    assert metrics["NS"] == 0.0


def test_magnitudes_hand_computed():
    # p = exp(-score); scores chosen so the probabilities are simple.
    s = lambda p: -math.log(p)  # noqa: E731
    metrics = fact_metrics(
        {
            "rewrite": [(s(0.6), s(0.2))],
            "paraphrase": [(s(0.5), s(0.1)), (s(0.3), s(0.4))],
            "neighborhood": [(s(0.1), s(0.7)), (s(0.2), s(0.4))],
        }
    )
    assert metrics["ES_magnitude"] == pytest.approx(0.4)
    assert metrics["PS_magnitude"] == pytest.approx((0.4 - 0.1) / 2)
    assert metrics["NS_magnitude"] == pytest.approx((0.6 + 0.2) / 2)  # p(true) - p(new)
    summary = aggregate([metrics])
    assert summary["ES_magnitude"]["mean"] == pytest.approx(40.0)
    assert summary["NS_magnitude"]["mean"] == pytest.approx(40.0)


def test_absent_families_absent_from_output():
    metrics = fact_metrics({"rewrite": [(0.1, 0.2)]})
    assert set(metrics) == {"ES", "ES_magnitude"}
    assert "S" not in aggregate([metrics])


def test_bad_families_rejected():
    with pytest.raises(ValueError):
        fact_metrics({"rewrite": []})
    with pytest.raises(ValueError):
        fact_metrics({"generation": [(0.1, 0.2)]})


def test_harmonic_mean():
    assert harmonic_mean([1.0, 1.0, 1.0]) == 1.0
    assert harmonic_mean([100.0, 50.0, 0.0]) == 0.0
    assert harmonic_mean([2.0, 6.0]) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        harmonic_mean([])


def test_word_tokens():
    assert word_tokens("I don't know, they'll say.") == [
        "I",
        "do",
        "n't",
        "know",
        ",",
        "they",
        "'ll",
        "say",
        ".",
    ]
    assert word_tokens("John's well-known 3.14 o'clock") == [
        "John",
        "'s",
        "well-known",
        "3.14",
        "o'clock",
    ]
    assert word_tokens("(a)...") == ["(", "a", ")", ".", ".", "."]
    assert word_tokens("") == []


def test_bigram_entropy_known_text():
    expected = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b", 2) == pytest.approx(expected)


def test_all_distinct_words_entropy_is_log_count():
    text = "one two three four five six seven"
    for n in (1, 2, 3):
        assert ngram_entropy(text, n) == pytest.approx(math.log2(7 - n + 1))
    assert ngram_entropy("one", 2) == 0.0


def test_generation_entropy_weights():
    text = "one two three four five six seven"
    h2, h3 = math.log2(6), math.log2(5)
    assert generation_entropy(text) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)


def test_aggregate_mean_std_and_scaling():
    rows = [
        {"ES": 1.0, "PS": 0.5, "NS": 0.8, "GE": 6.0},
        {"ES": 0.0, "PS": 1.0, "NS": 0.6, "GE": 6.2},
        {"ES": 1.0, "PS": 0.0, "NS": 1.0},
    ]
    summary = aggregate(rows)
    assert summary["ES"]["mean"] == pytest.approx(200 / 3)
    assert summary["ES"]["std"] == pytest.approx(np.std([100.0, 0.0, 100.0]))  # ddof=0
    assert summary["ES"]["n"] == 3
    assert summary["PS"]["mean"] == pytest.approx(50.0)
    assert summary["NS"]["mean"] == pytest.approx(80.0)
    assert summary["GE"] == {"mean": pytest.approx(610.0), "std": pytest.approx(10.0), "n": 2}
    assert summary["S"]["mean"] == pytest.approx(3 / (3 / 200 + 1 / 50 + 1 / 80))
    assert set(summary["S"]) == {"mean", "se"}  # a harmonic mean of means: no std


def test_aggregate_unknown_keys_unscaled_and_empty():
    assert aggregate([{"other": 2.0}, {"other": 4.0}])["other"]["mean"] == 3.0
    assert aggregate([]) == {}


def test_s_standard_error_by_hand_for_uncorrelated_metrics():
    # ES, PS, NS over 4 facts with zero sample covariance, every mean 50 %: S = 50, every
    # gradient S^2 / (3 m^2) = 1/3, each variance (ddof=1) 10000/3, so
    # SE(S) = sqrt(3 * (1/3)^2 * 10000/3 / 4) = 100/6
    rows = [
        {"ES": 1.0, "PS": 1.0, "NS": 1.0},
        {"ES": 0.0, "PS": 1.0, "NS": 0.0},
        {"ES": 1.0, "PS": 0.0, "NS": 0.0},
        {"ES": 0.0, "PS": 0.0, "NS": 1.0},
    ]
    summary = aggregate(rows)
    assert summary["S"]["mean"] == pytest.approx(50.0)
    assert summary["S"]["se"] == pytest.approx(100 / 6)

    # only ES varies: SE(S) = dS/dES * SE(ES), SE(ES) = sample std / sqrt(n)
    rows = [{"ES": es, "PS": 1.0, "NS": 0.8} for es in (1.0, 0.0, 1.0, 0.0)]
    summary = aggregate(rows)
    score = 3 / (1 / 50 + 1 / 100 + 1 / 80)
    se_es = math.sqrt(10000 / 3) / math.sqrt(4)
    assert summary["S"]["se"] == pytest.approx(score**2 / (3 * 50**2) * se_es)


def test_s_standard_error_matches_a_bootstrap():
    rng = np.random.default_rng(0)
    n = 400
    es = rng.uniform(0.3, 1.0, n)
    ps = np.clip(es - rng.uniform(0.0, 0.4, n), 0.0, 1.0)  # correlated with ES
    ns = rng.beta(4, 2, n)
    rows = [{"ES": a, "PS": b, "NS": c} for a, b, c in zip(es, ps, ns)]
    se = aggregate(rows)["S"]["se"]

    values = 100 * np.stack([es, ps, ns], axis=1)  # [n, 3]
    resamples = rng.integers(0, n, size=(4000, n))
    means = values[resamples].mean(axis=1)  # [4000, 3]
    scores = 3 / (1 / means).sum(axis=1)
    assert se == pytest.approx(float(np.std(scores, ddof=1)), rel=0.1)


def test_s_standard_error_undefined_for_one_fact_or_a_zero_mean():
    assert "se" not in aggregate([{"ES": 1.0, "PS": 0.5, "NS": 0.5}])["S"]
    zero_es = aggregate([{"ES": 0.0, "PS": 0.5, "NS": 0.5}, {"ES": 0.0, "PS": 1.0, "NS": 1.0}])
    assert zero_es["S"] == {"mean": 0.0}
    assert harmonic_mean_se([50.0, 50.0], np.array([[50.0, 50.0]])) is None
