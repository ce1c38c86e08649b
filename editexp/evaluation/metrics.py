"""CounterFact metrics as pure functions of prompt scores and generated text (no model).

A *score* is the teacher-forced mean over target tokens of ``-log p`` (lower = more likely),
so ``p = exp(-score)`` is the per-token geometric-mean probability of the target.

Per fact (:func:`fact_metrics`), values are **fractions and probabilities, unscaled**:

- ``ES`` / ``PS``: fraction of rewrite / paraphrase prompts with ``score_new < score_true``.
- ``NS``: fraction of neighbourhood prompts with ``score_true < score_new`` (they must keep
  the true answer). Ties count as failures everywhere (strict comparisons, as the reference).
- ``ES_magnitude`` / ``PS_magnitude``: mean of ``p(new) - p(true)`` over the family's
  prompts; ``NS_magnitude``: mean of ``p(true) - p(new)``, as UME (the paper's code): every
  magnitude is positive when its family succeeds (a kept neighbourhood is positive).
- ``GE``: mean of :func:`generation_entropy` over the fact's generated texts, in bits
  (the runner stores it per fact; about 6.15 for Llama-3-8B).

Across facts (:func:`aggregate`) every known metric (``ES``, ``PS``, ``NS``, the three
magnitudes and ``GE``) is **multiplied by 100**: ES/PS/NS become percentages, magnitudes
percentage points of probability, GE "bits x 100" (about 615 for Llama-3-8B), matching the
reference summariser which scales every reported number by 100. Keys not in
``SCALED_METRICS`` pass through unscaled. ``S`` is the harmonic mean of the *aggregated*
ES, PS and NS means (so it is also in percent), not a per-fact quantity: it has no std, but
a standard error by the delta method (:func:`harmonic_mean_se`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

FAMILIES = ("rewrite", "paraphrase", "neighborhood")

# family -> (success key, magnitude key, success when the *new* target is preferred?)
_FAMILY_KEYS: dict[str, tuple[str, str, bool]] = {
    "rewrite": ("ES", "ES_magnitude", True),
    "paraphrase": ("PS", "PS_magnitude", True),
    "neighborhood": ("NS", "NS_magnitude", False),
}

SCALED_METRICS = (
    "ES",
    "PS",
    "NS",
    "ES_magnitude",
    "PS_magnitude",
    "NS_magnitude",
    "GE",
)
SCALE = 100.0
S_PARTS = ("ES", "PS", "NS")  # S is their harmonic mean

# Weights of the bigram and trigram entropies in the reference's GE.
GE_WEIGHTS = {2: 2 / 3, 3: 4 / 3}


def fact_metrics(scores: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Success fractions and probability-gap magnitudes of one fact.

    ``scores`` maps a family in ``FAMILIES`` to ``(score_new, score_true)`` pairs, one per
    prompt. Families absent from ``scores`` are absent from the result; an empty list or an
    unknown family is an error (it would otherwise silently vanish from the averages).
    """
    out: dict[str, float] = {}
    for family, pairs in scores.items():
        if family not in _FAMILY_KEYS:
            raise ValueError(f"unknown prompt family {family!r}; expected one of {FAMILIES}")
        if len(pairs) == 0:
            raise ValueError(f"no prompts scored for family {family!r}")
        success_key, magnitude_key, prefers_new = _FAMILY_KEYS[family]
        new = np.array([pair[0] for pair in pairs], dtype=float)
        true = np.array([pair[1] for pair in pairs], dtype=float)
        success = new < true if prefers_new else true < new
        out[success_key] = float(np.mean(success))
        gap = np.exp(-new) - np.exp(-true)  # p(new) - p(true), per prompt
        out[magnitude_key] = float(np.mean(gap if prefers_new else -gap))
    return out


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative values; 0 if any value is 0."""
    if len(values) == 0:
        raise ValueError("harmonic mean of no values")
    if any(value < 0 for value in values):
        raise ValueError(f"harmonic mean needs non-negative values, got {list(values)}")
    if any(value == 0 for value in values):
        return 0.0
    return len(values) / sum(1.0 / value for value in values)


# Approximation of NLTK's ``word_tokenize`` (Treebank rules) with one regex, tried in order:
#   1. the stem of a negative contraction: "don't" -> "do", "can't" -> "ca" (as NLTK);
#   2. the clitic "n't";
#   3. the clitics 's 'm 'd 'll 're 've: "John's" -> "John", "'s"; "they'll" -> "they", "'ll";
#   4. numbers with internal separators kept whole: "3.14", "1,000", "10:30";
#   5. words, keeping internal hyphens ("well-known") and internal apostrophes that do not
#      start a clitic ("o'clock", "O'Neil");
#   6. any other non-space character is a token by itself.
# Differences from NLTK: every punctuation character is its own token ("..." gives three
# tokens, "--" two); quotes are not rewritten to `` and ''; abbreviations keep no period
# ("U.S." gives "U", ".", "S", "."); there is no sentence splitting (irrelevant here since
# only the token sequence matters). Case is preserved, as in NLTK.
_CLITICS = r"(?:s|m|d|ll|re|ve)"
_TOKEN_RE = re.compile(
    rf"""
    \w+(?=n't\b)
  | n't\b
  | '{_CLITICS}\b
  | \d+(?:[.,:]\d+)+
  | \w+(?:(?:-|'(?!{_CLITICS}\b|t\b))\w+)*
  | [^\w\s]
    """,
    re.VERBOSE | re.IGNORECASE,
)


def word_tokens(text: str) -> list[str]:
    """NLTK-style word tokens of ``text`` (regex approximation, see the comment above)."""
    return _TOKEN_RE.findall(text)


def ngram_entropy(text: str, n: int) -> float:
    """Entropy in bits of the frequency distribution of the word ``n``-grams of ``text``.

    A text with fewer than ``n`` tokens has no n-grams; its entropy is defined as 0 here
    (the reference would produce NaN).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokens = word_tokens(text)
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    if not counts:
        return 0.0
    freqs = np.array(list(counts.values()), dtype=float)
    freqs /= freqs.sum()
    return float(-np.sum(freqs * np.log2(freqs)))


def generation_entropy(text: str) -> float:
    """GE of one text as the reference computes it: ``mean(2/3 * H2, 4/3 * H3)``, in bits."""
    weighted = [weight * ngram_entropy(text, n) for n, weight in GE_WEIGHTS.items()]
    return float(np.mean(weighted))


def aggregate(per_fact: list[dict[str, float]]) -> dict[str, dict[str, float | int]]:
    """Mean, std and count over facts of every metric key present in ``per_fact``.

    Each key is averaged over the facts that have it (``n`` says how many). ``std`` is the
    population standard deviation (numpy's default ``ddof=0``), as in the reference. Keys in
    ``SCALED_METRICS`` are multiplied by 100 (see the module docstring); others are not.
    When ES, PS and NS are all present, ``"S": {"mean": harmonic_mean(ES, PS, NS means)}``
    is added, with ``"se"`` (:func:`harmonic_mean_se`, in percent) when it is defined.
    """
    keys: list[str] = []
    for row in per_fact:
        keys.extend(key for key in row if key not in keys)
    out: dict[str, dict[str, float | int]] = {}
    for key in keys:
        values = np.array([row[key] for row in per_fact if key in row], dtype=float)
        scale = SCALE if key in SCALED_METRICS else 1.0
        out[key] = {
            "mean": float(np.mean(values) * scale),
            "std": float(np.std(values) * scale),
            "n": int(values.size),
        }
    if all(key in out for key in S_PARTS):
        means = [float(out[key]["mean"]) for key in S_PARTS]
        out["S"] = {"mean": harmonic_mean(means)}
        complete = [[row[key] for key in S_PARTS] for row in per_fact if set(S_PARTS) <= set(row)]
        se = harmonic_mean_se(means, SCALE * np.array(complete, dtype=float).reshape(-1, 3))
        if se is not None:
            out["S"]["se"] = se
    return out


def harmonic_mean_se(means: Sequence[float], per_fact: np.ndarray) -> float | None:
    """Standard error of the harmonic mean ``S`` of ``means`` by the delta method.

    ``per_fact``: [n_facts, k] values whose column means are ``means`` (or near them: the
    facts that have every part). With the gradient ``g_j = dS/dm_j = S^2 / (k m_j^2)`` and
    the facts' covariance ``Sigma`` (ddof=1), ``SE(S) = sqrt(g^T Sigma g / n)``. None when
    fewer than 2 facts or a mean of 0 (``S`` = 0, not differentiable there).
    """
    n_facts, k = per_fact.shape
    if n_facts < 2 or any(mean <= 0 for mean in means):
        return None
    score = harmonic_mean(means)
    gradient = np.array([score**2 / (k * mean**2) for mean in means])  # [k]
    covariance = np.atleast_2d(np.cov(per_fact, rowvar=False, ddof=1))  # [k, k]
    return float(np.sqrt(max(gradient @ covariance @ gradient, 0.0) / n_facts))


def model_summaries(values: dict[str, float] | None) -> dict[str, dict[str, float]]:
    """Model-level metrics (one value for the model, not one per fact) as record blocks:
    ``{"PPL": 23.1}`` -> ``{"PPL": {"mean": 23.1}}``, unscaled."""
    return {key: {"mean": float(value)} for key, value in (values or {}).items()}
