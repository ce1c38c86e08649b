"""editexp computes what the paper's code (UME, unified-model-editing at 23d72b5) computes.

- the value objective equals UME's ``compute_z`` loop (:mod:`editexp.editing.plain_values`):
  same loss at step 0, same delta after 5 Adam steps, on tiny-llama3 and on SmolLM2;
- the unedited SmolLM2's per-fact ES/PS/NS and magnitudes on the first 64 CounterFact records
  equal the numbers UME's code computed (``shared/reference/ume-smollm2-pre-edit-64.json``).

docs/fidelity.md lists every point of agreement and the test that pins it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import PROJECT, cached_model, compose_config

from editexp.config import ValueHparams, run_settings
from editexp.data.corpus import CorpusError, CorpusSource, token_windows
from editexp.data.counterfact import load_counterfact
from editexp.editing.keys import EditRequest, compute_keys
from editexp.editing.plain_values import plain_values
from editexp.editing.prefixes import STARTERS, context_prefixes, prefix_text
from editexp.editing.values import KL_PROMPT, _value_rows, compute_values
from editexp.evaluation.counterfact_eval import evaluate_facts
from editexp.evaluation.generation_facts import spread_generation_facts
from editexp.evaluation.metrics import aggregate
from editexp.runner import run

# UME's per-fact numbers live next to the shared data (../shared/reference from the project).
REFERENCE_DIR = Path(
    os.environ.get("EDITEXP_REFERENCE_DIR")
    or Path(os.environ.get("EDITEXP_DATA_DIR") or PROJECT.parent / "shared" / "data").parent
    / "reference"
)
UME_HPARAMS = ValueHparams(  # UME's Llama files; no early stop, so every step is compared
    v_lr=0.5, v_steps=25, v_weight_decay=1e-3, kl_factor=0.0625, clamp_norm_factor=4.0
)
FACT = EditRequest(3, "The mother tongue of {} is", "Danielle Darrieux", "English")


def _float64(name: str):
    loaded = copy.copy(cached_model(name))
    loaded.model = copy.deepcopy(loaded.model).double()
    return loaded


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def _compare_with_ume(loaded, prefixes, layer: int, rtol: float) -> None:
    first = ValueHparams(**{**UME_HPARAMS.__dict__, "v_steps": 1, "early_stop_loss": -1.0})
    fast = compute_values(loaded, [FACT], prefixes, layer, first, progress=False)
    ume = plain_values(loaded, [FACT], prefixes, layer, first)
    assert fast.steps.item() == ume.steps.item() == 0
    torch.testing.assert_close(fast.losses, ume.losses, rtol=1e-6, atol=0)  # step 0
    assert _relative(fast.outputs, ume.outputs) < 1e-6  # target_init

    five = ValueHparams(**{**UME_HPARAMS.__dict__, "v_steps": 6, "early_stop_loss": -1.0})
    fast = compute_values(loaded, [FACT], prefixes, layer, five, progress=False)
    ume = plain_values(loaded, [FACT], prefixes, layer, five)
    assert fast.steps.item() == ume.steps.item() == 5
    difference = _relative(fast.deltas, ume.deltas)
    assert difference < rtol, f"delta after 5 steps differs by {difference:.2e} (relative)"
    assert ume.deltas.norm() > 0


def test_value_objective_is_umes_compute_z_on_tiny_llama3():
    loaded = _float64("tiny-llama3")
    prefixes = ["", "The weather was nice today. ", "I think that. ", "Because it rained. "]
    _compare_with_ume(loaded, prefixes, layer=1, rtol=1e-5)


@pytest.mark.slow
def test_value_objective_is_umes_compute_z_on_smollm2(smollm2):
    prefixes = context_prefixes(smollm2, count=5, length=10, seed=0)
    assert len(prefixes) == 6 and prefixes[0] == ""
    # float64: in float32, 5 Adam steps carry rounding to ~1e-5, and how much depends on the
    # thread count (batch shapes differ between the two codes), so compare the math itself
    _compare_with_ume(_float64("smollm2-135m"), prefixes, layer=1, rtol=1e-5)


# --- GE coverage (item 7) ---------------------------------------------------------------------


def test_generation_facts_spread_over_every_batch_of_a_sequential_run():
    case_ids = list(range(1000, 1000 + 4096))
    chosen = spread_generation_facts(case_ids, batch_size=256, count=100)
    assert len(chosen) == len(set(chosen)) == 100
    assert chosen == sorted(chosen)  # in run order
    per_batch = [sum(1 for c in chosen if (c - 1000) // 256 == b) for b in range(16)]
    assert min(per_batch) >= 6 and max(per_batch) <= 7  # every one of the 16 updates
    # fewer facts than updates: spread evenly over the run, not the first updates
    sparse = spread_generation_facts(list(range(10)), batch_size=1, count=5)
    assert sparse == [1, 3, 5, 7, 9]
    # one batch: spread over it
    assert spread_generation_facts(list(range(8)), batch_size=8, count=2) == [2, 6]


def test_generation_facts_all_none_and_bad_values():
    assert spread_generation_facts([5, 6, 7], 1, "all") == [5, 6, 7]
    assert spread_generation_facts([5, 6, 7], 3, 10) == [5, 6, 7]
    assert spread_generation_facts([5, 6, 7], 1, 0) == []
    for bad in (-1, 1.5, "some", True, None):
        with pytest.raises(ValueError, match="eval.generation_facts"):
            spread_generation_facts([5, 6, 7], 1, bad)


def test_ge_is_measured_in_every_batch_of_a_sequential_run(tmp_path):
    """The runner generates for the spread facts, each after the update that scores it."""
    overrides = [
        "model=tiny-llama3",
        "logger=none",
        "stats.n_tokens=3000",
        "stats.seq_len=64",
        "eval.generation_length=12",
        "eval.held_out_keys=0",
        "editing.prefixes.count=1",
        "editing.prefixes.length=4",
        "model.hparams.memit.v_steps=2",
        "algorithm=memit",
        "mode=sequential",
        "n_edits=6",
        "batch_size=2",
    ]
    run(compose_config(*overrides, "eval.generation_facts=3"), tmp_path / "three")
    rows = [
        json.loads(line) for line in (tmp_path / "three" / "facts.jsonl").read_text().splitlines()
    ]
    with_ge = [row["batch"] for row in rows if "GE" in row["post"]]
    assert with_ge == [0, 1, 2]
    run(compose_config(*overrides, "eval.generation_facts=all"), tmp_path / "all")
    rows = [
        json.loads(line) for line in (tmp_path / "all" / "facts.jsonl").read_text().splitlines()
    ]
    assert all("GE" in row["post"] and "GE" in row["pre"] for row in rows)


# --- Llama-2 prefixes (item 8) ----------------------------------------------------------------

SP_WORDS = ("The", "Therefore", "Because", "I", "You", "the", "city", "is", "a", "big", "and")


def sentencepiece_like_tokenizer():
    """A tiny tokenizer with Llama-2's SentencePiece behaviour: the normalizer turns spaces
    into "▁" and prepends one, BOS is added, and the decoder strips the leading space of the
    first decoded token (so decoding a continuation alone loses its space)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({"\u2581" + word: 3 + index for index, word in enumerate(SP_WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    backend.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + [decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_prefixes_keep_the_space_after_the_starter_with_a_llama2_tokenizer(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = sentencepiece_like_tokenizer()
    starter, continuation = (
        tokenizer("The").input_ids,
        tokenizer("city is", add_special_tokens=False),
    )
    assert tokenizer.decode(continuation.input_ids) == "city is"  # the space is gone alone
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(tmp_path))
    loaded = SimpleNamespace(
        model=model,
        tokenizer=tokenizer,
        weights_identity="sp-test",
        frozen_rounded=False,
        device=torch.device("cpu"),
        spec=SimpleNamespace(name="sp"),
    )
    prefixes = context_prefixes(loaded, count=5, length=8, seed=0)
    assert prefixes[0] == ""
    for starter_word, prefix in zip(STARTERS, prefixes[1:]):
        assert prefix.endswith(". ")
        words = prefix[:-2].split()
        assert words[0] == starter_word, prefix
        assert set(words) <= set(SP_WORDS), prefix  # no glued "Thethe"
        assert len(words) > 1, prefix
    assert prefix_text(tokenizer, starter + continuation.input_ids) == "The city is. "


# --- scoring: the unedited SmolLM2 against UME's own numbers ------------------------------------


@pytest.mark.slow
def test_pre_edit_scores_equal_umes_on_64_facts(smollm2):
    """ES/PS/NS per fact exactly, magnitudes (NS: p(true) - p(new)) within 0.01 points."""
    path = REFERENCE_DIR / "ume-smollm2-pre-edit-64.json"
    if not path.is_file():
        pytest.skip(f"{path} is missing (set EDITEXP_REFERENCE_DIR)")
    reference = json.loads(path.read_text())
    wanted = [row["case_id"] for row in reference["facts"]]
    assert len(wanted) == 64
    facts, _ = load_counterfact(compose_config().data)
    by_case = {fact.case_id: fact for fact in facts}
    results = evaluate_facts(
        smollm2.model, smollm2.tokenizer, [by_case[case] for case in wanted], progress=False
    )
    for row, result in zip(reference["facts"], results):
        metrics = result.metrics()
        for key in ("ES", "PS", "NS"):
            assert round(100 * metrics[key], 2) == row[key], (row["case_id"], key)
        for key in ("ES_magnitude", "PS_magnitude", "NS_magnitude"):
            assert abs(100 * metrics[key] - row[key]) <= 0.01 + 1e-9, (row["case_id"], key)
    means = aggregate([result.metrics() for result in results])
    for key in ("ES", "PS", "NS"):
        assert round(means[key]["mean"], 2) == reference["aggregate_pre"][key]


@pytest.mark.slow
def test_rows_and_keys_tokenise_as_ume_on_64_facts(smollm2):
    """On the 64 reference facts with SmolLM2's seed-0 prefixes, every rewriting prompt's ids,
    lookup index and target ids equal UME's full-string tokenisation (``compute_z``), and k*
    equals UME's ``compute_ks`` (lookups in the re-tokenised context, two-level mean)."""
    tok = smollm2.tokenizer
    case_ids = [int(line) for line in (REFERENCE_DIR / "ume-smollm2-case-ids-64.txt").open()]
    facts, _ = load_counterfact(compose_config().data)
    by_case = {fact.case_id: fact for fact in facts}
    requests = [
        EditRequest(case, by_case[case].prompt, by_case[case].subject, by_case[case].target_new)
        for case in case_ids
    ]
    prefixes = context_prefixes(smollm2, count=5, length=10, seed=0)
    rows = iter(_value_rows(smollm2, requests, prefixes))
    for request in requests:
        target_ids = tok(" " + request.target_new).input_ids
        for prefix in prefixes:
            template = prefix + request.prompt + tok.decode(target_ids[:-1])
            before = template.split("{}")[0] + request.subject
            row = next(rows)
            assert row.ids == tok(template.format(request.subject)).input_ids, template
            assert row.split == len(tok.encode(before)) - 1 and row.targets == target_ids
        kl_row = next(rows)
        assert kl_row.is_kl and kl_row.split == len(tok.encode(request.subject)) - 1
        assert kl_row.ids == tok(KL_PROMPT.format(request.subject)).input_ids[: kl_row.split + 1]

    keys = compute_keys(smollm2, requests, prefixes, [1])[1].T  # (64, d_k)
    inputs: list[torch.Tensor] = []
    hook = smollm2.edit_module(1).register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    ume_keys = []
    try:
        with torch.no_grad():
            for request in requests:
                templates = [prefix + request.prompt for prefix in prefixes]
                texts = [template.format(request.subject) for template in templates]
                batch = tok(texts, return_tensors="pt", padding=True, padding_side="right")
                inputs.clear()
                smollm2.model(**batch)
                lookups = [
                    len(tok.encode(t.split("{}")[0] + request.subject)) - 1 for t in templates
                ]
                read = torch.stack([inputs[0][i, index] for i, index in enumerate(lookups)])
                ume_keys.append((read[0] + read[1:].mean(dim=0)) / 2)  # compute_ks' two groups
    finally:
        hook.remove()
    ume_keys = torch.stack(ume_keys)
    relative = (keys - ume_keys).norm(dim=1) / ume_keys.norm(dim=1)
    assert relative.max() < 1e-5


# --- statistics cost (item 5) ------------------------------------------------------------------


def test_stats_estimate_counts_the_weights_up_to_the_deepest_layer(tiny_llama3):
    from editexp.stats_cli import REFERENCE_RATES, estimate, forward_flops_per_token

    blocks = tiny_llama3.model.model.layers
    per_layer = sum(p.numel() for p in blocks[0].parameters())
    assert forward_flops_per_token(tiny_llama3.model, "model.layers", 1) == 2 * 2 * per_layer
    text = estimate(2 * 218e6 * 2, 1_500_000, 14336)  # Llama-3-8B layer 1 (218M weights/layer)
    assert "1,500,000 tokens (105 per key dimension" in text
    assert "1,308.0 TFLOP" in text and len(text.splitlines()) == 1 + len(REFERENCE_RATES)


def test_large_models_default_to_wikipedia_scale_statistics():
    large = {"llama3-8b": 14336, "llama2-7b": 11008, "gpt-j-6b": 16384, "gpt2-xl": 6400}
    for name, d_k in large.items():
        cfg = compose_config(f"model={name}")
        assert cfg.stats.corpus.dataset == "Salesforce/wikitext" and not cfg.stats.corpus.files
        assert cfg.stats.corpus.dataset_config == "wikitext-103-raw-v1"
        assert cfg.stats.n_tokens >= 100 * d_k
    cfg = compose_config("model=smollm2-135m")
    source = CorpusSource.from_config(cfg.stats, cfg.data)
    assert [path.name for path in source.files] == ["wikitext-2-raw-test.txt"]
    assert cfg.stats.n_tokens == 100_000
    with pytest.raises(CorpusError, match="both set"):
        CorpusSource.from_config(
            compose_config("stats.corpus.dataset=Salesforce/wikitext").stats, cfg.data
        )


# --- presets and per-model hyperparameters (item 6) ---------------------------------------------


def test_presets_set_lambda_explicitly():
    for algorithm, expected in (("rome", None), ("memit", 1.0)):
        cfg = compose_config("+experiment=layer_search", f"algorithm={algorithm}")
        assert cfg["lambda"] == expected and cfg.eval.generation_facts == 100
    for preset in ("batch_scaling", "sequential_batch_scaling"):
        for algorithm, expected in (("memit", 5e4), ("emmet", 0.0)):
            cfg = compose_config(
                f"+experiment={preset}", "model=llama3-8b", f"algorithm={algorithm}"
            )
            assert run_settings(cfg).lam == expected
            assert cfg.eval.generation_facts == 100


def test_llama_value_hparams_are_umes():
    for name in ("llama3-8b", "llama2-7b"):
        for algorithm in ("rome", "memit", "emmet"):
            settings = run_settings(
                compose_config(f"model={name}", f"algorithm={algorithm}", "mode=singular")
            )
            assert settings.hparams == ValueHparams(
                v_lr=0.5, v_steps=25, v_weight_decay=1e-3, kl_factor=0.0625, clamp_norm_factor=4.0
            )


def test_documents_layout_starts_every_paragraph_at_position_zero(tiny_llama3, tmp_path):
    """stats.corpus.documents=true reads the corpus as UME's layer_stats does: one sequence per
    paragraph (BOS first, as every prompt), cut at seq_len; held-out windows come after."""
    text = tmp_path / "three.txt"
    text.write_text("Alpha beta gamma.\n\nDelta epsilon.\nZeta eta theta iota kappa lambda mu.\n")
    stats_cfg = {"corpus": {"files": [str(text)], "documents": True}}
    source = CorpusSource.from_config(stats_cfg, None)
    tokenizer = tiny_llama3.tokenizer
    paragraphs = [line + "\n" for line in text.read_text().split("\n") if line]
    expected = [tokenizer(p).input_ids[:6] for p in paragraphs]  # BOS + text, cut at 6
    assert list(token_windows(tokenizer, source, 6, 1000)) == expected
    cut = expected[1][: 8 - len(expected[0])]  # n_tokens=8 cuts the second paragraph short
    assert list(token_windows(tokenizer, source, 6, 8)) == [expected[0], cut]
    # held-out windows skip the paragraphs that fill first_window * (seq_len - BOS) text ids
    skipped, text_ids = 0, 0
    while text_ids < 5:
        text_ids += len(expected[skipped]) - 1
        skipped += 1
    held_out = list(token_windows(tokenizer, source, 6, 1000, first_window=1))
    assert held_out == expected[skipped:] and 0 < skipped < len(expected)
    running = CorpusSource.from_config({"corpus": {"files": [str(text)]}}, None)
    assert running.identity() != source.identity()
    with pytest.raises(CorpusError, match="documents"):
        CorpusSource.from_config({"corpus": {"files": [str(text)], "documents": "yes"}}, None)
