"""The precision setting: what each precision stores and runs in, what stays exact in
bf16-mixed, run identity and cache keys, and whole runs in every precision and mode (tiny
models; the SmolLM2 comparison is benchmarks/precision.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_RUN, compose_config
from console_scripts import editexp, user_error

from editexp.editing.editor import EditingError, Editor
from editexp.editing.prefixes import context_prefixes
from editexp.evaluation.scoring import _log_softmax_logits
from editexp.layer_stats import _MomentSums
from editexp.models import load_model
from editexp.precision import PRECISIONS, PrecisionError, get_precision
from editexp.run_dir import comparable_config
from editexp.runner import run

MODES = {
    "batch": ["algorithm=memit", "mode=batch", "n_edits=2"],
    "sequential": ["algorithm=emmet", "mode=sequential", "n_edits=4", "batch_size=2", "lambda=0.1"],
    "singular": ["algorithm=rome", "mode=singular", "n_edits=2"],
}


def test_precisions_and_the_error_for_an_unknown_one():
    assert list(PRECISIONS) == ["64-true", "32-true", "bf16-mixed", "bf16-true"]
    mixed = get_precision("bf16-mixed")
    assert mixed.weights == torch.float32 and mixed.matmul_dtype == torch.bfloat16
    assert get_precision(None).name == "32-true"
    with pytest.raises(PrecisionError, match="precision='16-mixed'; expected one of 64-true"):
        get_precision("16-mixed")


def test_a_cpu_without_bfloat16_units_is_refused_in_one_line(tmp_path, monkeypatch):
    """bf16 matmuls emulated in software (no AMX, no AVX512-BF16) cost ~50x float32: the run
    stops before the model loads, unless the user insists."""
    import editexp.precision as precision

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    monkeypatch.delenv(precision.ALLOW_EMULATED_BF16)
    line = user_error(editexp(tmp_path / "run", "precision=bf16-mixed", "device=cpu"))
    assert "precision=bf16-mixed: this CPU has no bfloat16 units (AMX or AVX512-BF16" in line
    assert "use precision=32-true" in line and not (tmp_path / "run" / "summary.json").exists()
    with pytest.raises(PrecisionError, match="precision=bf16-true: this CPU has no bfloat16"):
        get_precision("bf16-true").check_device("cpu")
    get_precision("32-true").check_device("cpu")  # float32 matmuls: nothing to check
    monkeypatch.setenv(precision.ALLOW_EMULATED_BF16, "1")
    get_precision("bf16-mixed").check_device("cpu")


def test_precision_joins_the_run_identity_without_changing_32_true_hashes():
    default = comparable_config(compose_config("model=tiny-llama3"))
    explicit = comparable_config(compose_config("model=tiny-llama3", "precision=32-true"))
    mixed = comparable_config(compose_config("model=tiny-llama3", "precision=bf16-mixed"))
    # 32-true is compared as the model.dtype / stats.dtype keys it replaced said it
    assert default == explicit and "precision" not in default
    assert default["model"]["dtype"] == default["stats"]["dtype"] == "float32"
    assert mixed["precision"] == "bf16-mixed" and mixed != default


def test_mixed_stores_frozen_matrices_in_bf16_and_keeps_the_rest_float32():
    loaded = load_model("tiny-llama3", "cpu", "bf16-mixed")
    model = loaded.model
    assert loaded.identity.endswith("|bf16-mixed") and ":float32" in loaded.weights_identity
    # float32 until the first pass (the prefixes are sampled from it), rounded from then on
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    with loaded.compute():
        assert torch.is_autocast_enabled("cpu")
    assert all(loaded.edit_module(layer).weight.dtype == torch.float32 for layer in range(2))
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.get_output_embeddings().weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    # The rounded matrices hold what autocast would round the float32 ones to.
    full = load_model("tiny-llama3", "cpu", "32-true").model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, full.to(torch.bfloat16))


def test_mixed_samples_the_prefixes_of_the_float32_model(cache_dir, monkeypatch):
    mixed = load_model("tiny-llama3", "cpu", "bf16-mixed")
    passes = []  # (autocast on?, dtype of a frozen matrix) at every forward pass
    mixed.model.model.register_forward_pre_hook(
        lambda module, args: passes.append(
            (torch.is_autocast_enabled("cpu"), module.layers[0].mlp.up_proj.weight.dtype)
        )
    )
    prefixes = context_prefixes(mixed, count=3, length=6, seed=1)
    assert passes and set(passes) == {(False, torch.float32)}
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(cache_dir / "another"))  # sampled afresh:
    assert context_prefixes(load_model("tiny-llama3", "cpu"), 3, 6, 1) == prefixes  # 32-true
    # After a pass in bfloat16 the float32 model is gone: sampled in bf16, cached apart.
    with mixed.compute():
        pass
    passes.clear()
    context_prefixes(mixed, count=3, length=6, seed=1)
    assert passes and set(passes) == {(True, torch.bfloat16)}


def test_mixed_sweep_cache_key_does_not_depend_on_whether_a_pass_ran(cache_dir):
    """The value/key cache of bf16-mixed is keyed by the weights as its passes use them: an
    Editor whose statistics came from the cache (no pass yet, the frozen matrices still
    float32) finds the entries of one that computed them (and so rounded them)."""
    small = {"stats.n_tokens": 500, "stats.seq_len": 64, "eval.held_out_keys": 8}
    first = Editor.from_pretrained("tiny-llama3", precision="bf16-mixed", device="cpu", **small)
    second = Editor.from_pretrained("tiny-llama3", precision="bf16-mixed", device="cpu", **small)
    assert not second.model.frozen_rounded  # its statistics were read, not computed
    assert second.sweep_cache(1).fingerprint == first.sweep_cache(1).fingerprint


def test_c0_sums_stay_float64_inside_autocast():
    """The strips of k k^T are summed from the (bfloat16-computed) keys exactly: products
    taken in bfloat16 under the forward's autocast would be off by ~1e-3."""
    keys = torch.randn(300, 600, generator=torch.Generator().manual_seed(0))
    sums = _MomentSums(torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums.add(keys)
    stats = sums.finish(layer=0)
    expected = keys.double().T @ keys.double() / 300
    assert torch.allclose(stats.second_moment, expected, rtol=1e-12, atol=1e-12)


def test_scored_log_probabilities_leave_autocast():
    """Scores read float32 logits even inside the mixed-precision forward."""
    loaded = load_model("tiny-llama3", "cpu", "bf16-mixed")
    hidden = torch.randn(3, loaded.model.config.hidden_size)
    outside = _log_softmax_logits(loaded.model, hidden)
    with loaded.compute():
        inside = _log_softmax_logits(loaded.model, hidden)
        plain_head = loaded.model.get_output_embeddings()(hidden)
    assert inside.dtype == torch.float32 and torch.equal(inside, outside)
    assert plain_head.dtype == torch.bfloat16  # what autocast alone would have given


def test_editor_from_pretrained_takes_a_precision(cache_dir):
    editor = Editor.from_pretrained("tiny-llama3", precision="bf16-mixed", device="cpu")
    assert editor.cfg.precision == "bf16-mixed" and editor.model.precision.name == "bf16-mixed"
    with pytest.raises(EditingError, match="precision=bf16-true, but the model was loaded in"):
        Editor.from_pretrained(editor.model, precision="bf16-true")


def _finite(row) -> bool:
    if isinstance(row, dict):
        return all(_finite(value) for value in row.values())
    if isinstance(row, list):
        return all(_finite(value) for value in row)
    return not isinstance(row, float) or math.isfinite(row)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_every_precision_and_mode_runs_without_nan(tmp_path, cache_dir, precision, mode):
    cfg = compose_config(*TINY_RUN, *MODES[mode], f"precision={precision}")
    record = run(cfg, tmp_path / "run").to_json()
    assert record["precision"] == precision
    assert _finite(record["pre"]) and _finite(record["post"]) and _finite(record["update_mean"])
    for name in ("facts.jsonl", "batches.jsonl"):
        for line in (tmp_path / "run" / name).read_text().splitlines():
            assert _finite(json.loads(line))
    if mode != "singular":  # a singular run keeps no edit
        deltas = torch.load(tmp_path / "run" / "deltas.pt", weights_only=True)["deltas"]
        assert deltas and all(torch.isfinite(delta).all() for delta in deltas.values())
