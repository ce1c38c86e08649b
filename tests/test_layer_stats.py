"""Layer statistics: C0 against a plain computation, the early stop, padding, batching, the
per-layer cache and its lock, held-out keys, the corpus windows, and editexp-stats."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import DictConfig, OmegaConf
from torch import nn

import editexp.layer_stats as stats_module
import editexp.stats_cli as stats_cli
from editexp.data.corpus import (
    CorpusError,
    CorpusSource,
    corpus_batches,
    special_prefix,
    token_windows,
)
from editexp.layer_stats import (
    HELD_OUT_STRIDE,
    StatsError,
    collect_layer_stats,
    load_or_compute_stats,
    sample_keys,
)
from editexp.precision import get_precision

PROJECT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("EDITEXP_DATA_DIR", str(PROJECT.parent / "shared" / "data"))
SEQ_LEN = 64
N_TOKENS = 1000


def stats_config(**overrides) -> DictConfig:
    settings = {
        "corpus": {"files": None, "dataset": None},
        "n_tokens": N_TOKENS,
        "seq_len": SEQ_LEN,
        "batch_size": 4,
    }
    settings.update(overrides)
    return OmegaConf.create(settings)


def data_config(data_dir: str | None = DATA_DIR) -> DictConfig:
    return OmegaConf.create({"dir": data_dir})


def corpus_source() -> CorpusSource:
    return CorpusSource.from_config(stats_config(), data_config())


def windows(loaded, n_tokens: int = N_TOKENS, first_window: int = 0) -> list[list[int]]:
    return list(token_windows(loaded.tokenizer, corpus_source(), SEQ_LEN, n_tokens, first_window))


def batches(loaded, batch_size: int, n_tokens: int = N_TOKENS):
    return list(corpus_batches(loaded.tokenizer, corpus_source(), SEQ_LEN, n_tokens, batch_size))


def plain_keys(loaded, layer: int, batch_list) -> torch.Tensor:
    """Keys (N, d_k) of every real token: the full model runs, a plain hook records the input."""
    captured: list[torch.Tensor] = []
    module = loaded.edit_module(layer)
    handle = module.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
    keys = []
    try:
        with torch.no_grad():
            for input_ids, attention_mask in batch_list:
                captured.clear()
                loaded.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                keys.append(captured[0][attention_mask.bool()])
    finally:
        handle.remove()
    return torch.cat(keys)


def plain_second_moment(keys: torch.Tensor) -> torch.Tensor:
    keys = keys.double()
    return keys.T @ keys / keys.shape[0]


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale)


# --- C0 itself --------------------------------------------------------------------------------


def test_second_moment_matches_plain_computation(tiny):
    """Also the GPT-2 path: its c_proj is a Conv1D."""
    layer = 1
    batch_list = batches(tiny, batch_size=4)
    keys = plain_keys(tiny, layer, batch_list)
    stats = collect_layer_stats(
        tiny.model, tiny.spec.edit_module, [layer], batch_list, N_TOKENS, progress=False
    )[layer]
    assert stats.n_tokens == N_TOKENS == keys.shape[0]
    assert stats.second_moment.dtype == stats.mean.dtype == torch.float64
    # float32 per-batch products: about 1e-7 relative to the all-float64 computation
    assert_close_relative(stats.second_moment, plain_second_moment(keys), 1e-6)
    assert_close_relative(stats.mean, keys.double().mean(dim=0), 1e-6)
    exact = collect_layer_stats(
        tiny.model,
        tiny.spec.edit_module,
        [layer],
        batch_list,
        N_TOKENS,
        progress=False,
        product_dtype=torch.float64,
    )[layer]
    assert_close_relative(exact.second_moment, plain_second_moment(keys), 1e-12)


def test_second_moment_is_symmetric_positive_semidefinite(tiny):
    stats = collect_layer_stats(
        tiny.model, tiny.spec.edit_module, [0, 2], batches(tiny, 4), N_TOKENS, progress=False
    )
    for layer_stats in stats.values():
        c0 = layer_stats.second_moment
        assert torch.equal(c0, c0.T)
        assert float(torch.linalg.eigvalsh(c0)[0]) >= -1e-12 * float(c0.diagonal().max())
        assert torch.isfinite(c0).all()


def test_several_layers_in_one_pass_equal_one_at_a_time(tiny_llama3):
    loaded = tiny_llama3
    batch_list = batches(loaded, 4)
    together = collect_layer_stats(
        loaded.model, loaded.spec.edit_module, [0, 1, 3], batch_list, N_TOKENS, progress=False
    )
    for layer in (0, 1, 3):
        alone = collect_layer_stats(
            loaded.model, loaded.spec.edit_module, [layer], batch_list, N_TOKENS, progress=False
        )[layer]
        assert torch.equal(together[layer].second_moment, alone.second_moment)
        assert torch.equal(together[layer].mean, alone.mean)


class EmbeddingKeysModel(nn.Module):
    """A model whose layer-0 keys are embedding rows, bit for bit, whatever the batch shape;
    later layers run after it (and would fail the test if the early stop did not happen)."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"mlp": nn.ModuleDict({"down_proj": nn.Linear(width, width)})})
            for _ in range(2)
        )

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = hidden + layer["mlp"]["down_proj"](hidden)
        raise AssertionError("the forward pass ran past the deepest requested layer")


def test_accumulation_is_batch_size_invariant_to_float64_rounding():
    model = EmbeddingKeysModel()
    token_ids = torch.randint(0, 50, (24, 16), generator=torch.Generator().manual_seed(1))
    results = [
        collect_layer_stats(
            model,
            "layers.{}.mlp.down_proj",
            [0],
            list(token_ids.split(batch_size)),
            300,
            progress=False,
            product_dtype=torch.float64,
        )[0]
        for batch_size in (1, 5, 24)
    ]
    keys = model.embed.weight.detach()[token_ids.flatten()[:300]]
    for result in results:
        assert result.n_tokens == 300
        assert_close_relative(result.second_moment, plain_second_moment(keys), 1e-14)
        assert_close_relative(result.mean, keys.double().mean(dim=0), 1e-14)


def test_batch_size_changes_the_result_only_at_float32_rounding(tiny):
    """On a real model the forward pass itself rounds differently for different batch shapes
    (keys differ by ~1e-7 relative), so C0 agrees to that level, with float32 or float64
    per-batch products alike; the cache key leaves the batch size out."""
    for product_dtype in (torch.float32, torch.float64):
        results = [
            collect_layer_stats(
                tiny.model,
                tiny.spec.edit_module,
                [1],
                batches(tiny, batch_size),
                N_TOKENS,
                progress=False,
                product_dtype=product_dtype,
            )[1]
            for batch_size in (1, 3, 8)
        ]
        for other in results[1:]:
            assert other.n_tokens == results[0].n_tokens == N_TOKENS
            assert_close_relative(other.second_moment, results[0].second_moment, 1e-6)
            assert_close_relative(other.mean, results[0].mean, 1e-6)


def test_padding_tokens_are_excluded(tiny):
    """Two windows of unequal length padded with arbitrary ids give the same statistics as
    each window alone, and only their real tokens count."""
    first, second = windows(tiny)[:2]
    second = second[:37]
    input_ids = torch.randint(0, 1000, (2, len(first)))  # the padding: random ids
    input_ids[0] = torch.tensor(first)
    input_ids[1, : len(second)] = torch.tensor(second)
    attention_mask = torch.zeros_like(input_ids)
    attention_mask[0] = 1
    attention_mask[1, : len(second)] = 1
    n_real = len(first) + len(second)

    def collect(batch_list):
        return collect_layer_stats(
            tiny.model,
            tiny.spec.edit_module,
            [1],
            batch_list,
            10**6,
            progress=False,
            product_dtype=torch.float64,
        )[1]

    padded = collect([(input_ids, attention_mask)])
    alone = collect([torch.tensor([first]), torch.tensor([second])])
    assert padded.n_tokens == alone.n_tokens == n_real
    # the batch shape differs, so the forward pass rounds differently (see above)
    assert_close_relative(padded.second_moment, alone.second_moment, 1e-6)
    assert_close_relative(padded.mean, alone.mean, 1e-6)


def test_stops_after_n_tokens(tiny_llama3):
    loaded = tiny_llama3
    batch_list = batches(loaded, 4)
    stats = collect_layer_stats(
        loaded.model, loaded.spec.edit_module, [1], batch_list, 300, progress=False
    )[1]
    keys = plain_keys(loaded, 1, batch_list)[:300]
    assert stats.n_tokens == 300
    assert_close_relative(stats.second_moment, plain_second_moment(keys), 1e-6)


def test_forward_pass_stops_at_the_deepest_layer(tiny):
    """Nothing after the deepest requested edited module runs: not the layer's own output,
    not later layers, not the final norm or the unembedding."""
    calls: list[str] = []
    modules = {
        "edit": tiny.edit_module(1),  # its forward: the hook stops the pass before it
        "next layer": tiny.layer_module(2),
        "final norm": getattr(tiny.model.base_model, "norm", None) or tiny.model.base_model.ln_f,
        "unembedding": tiny.model.get_output_embeddings(),
    }
    handles = [
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
        for name, module in modules.items()
    ]
    try:
        stats = collect_layer_stats(
            tiny.model, tiny.spec.edit_module, [0, 1], batches(tiny, 4), N_TOKENS, progress=False
        )
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []
    assert stats[1].n_tokens == N_TOKENS and float(stats[1].second_moment.trace()) > 0


def test_half_precision_forward_and_rejected_dtype(tiny_llama3):
    loaded = tiny_llama3
    batch_list = batches(loaded, 4, n_tokens=256)

    def collect(dtype):
        return collect_layer_stats(
            loaded.model, loaded.spec.edit_module, [1], batch_list, 256, False, dtype=dtype
        )[1]

    full, half = collect(torch.float32), collect(torch.bfloat16)
    assert half.second_moment.dtype == torch.float64
    assert not torch.equal(full.second_moment, half.second_moment)
    assert_close_relative(half.second_moment, full.second_moment, 0.1)
    assert next(loaded.model.parameters()).dtype == torch.float32
    with pytest.raises(StatsError, match="float64"):
        collect(torch.float64)


# --- the cache --------------------------------------------------------------------------------


def spy_on_collection(monkeypatch, delay: float = 0.0) -> list[list[int]]:
    """Record the layers of every real collection pass."""
    calls: list[list[int]] = []
    real = stats_module.collect_layer_stats

    def spy(model, template, layers, *args, **kwargs):
        calls.append(sorted(layers))
        time.sleep(delay)
        return real(model, template, layers, *args, **kwargs)

    monkeypatch.setattr(stats_module, "collect_layer_stats", spy)
    return calls


def test_cache_per_layer_computes_only_missing_layers(tiny_llama3, cache_dir, monkeypatch):
    loaded = tiny_llama3
    calls = spy_on_collection(monkeypatch)
    cfg, data = stats_config(), data_config()
    first = load_or_compute_stats(loaded, [1], cfg, data, progress=False, held_out_keys=0)
    assert calls == [[1]] and not first[1].from_cache
    assert first[1].path.is_file() and first[1].path.is_relative_to(cache_dir / "stats")

    second = load_or_compute_stats(loaded, [0, 1, 2], cfg, data, progress=False, held_out_keys=0)
    assert calls == [[1], [0, 2]]  # one pass for the two missing layers
    assert second[1].from_cache and not second[0].from_cache and not second[2].from_cache

    def must_not_run(*args, **kwargs):
        raise AssertionError("statistics were recomputed instead of read from the cache")

    monkeypatch.setattr(stats_module, "collect_layer_stats", must_not_run)
    third = load_or_compute_stats(loaded, [2, 0, 1], cfg, data, progress=False, held_out_keys=0)
    assert list(third) == [0, 1, 2]
    for layer in (0, 1, 2):
        assert third[layer].from_cache
        assert torch.equal(third[layer].second_moment, second[layer].second_moment)
        assert torch.equal(third[layer].mean, second[layer].mean)
        assert third[layer].n_tokens == N_TOKENS
    assert torch.equal(third[1].second_moment, first[1].second_moment)


def test_cache_key_covers_what_changes_the_result(tiny_llama3, cache_dir, monkeypatch):
    loaded = tiny_llama3
    data = data_config()

    def run(**overrides):
        cfg = stats_config(**overrides)
        return load_or_compute_stats(loaded, [1], cfg, data, progress=False, held_out_keys=0)[1]

    base = run()
    other_batch = run(batch_size=3)
    assert other_batch.path == base.path and other_batch.from_cache
    assert run(n_tokens=N_TOKENS // 2).path != base.path
    assert run(seq_len=SEQ_LEN // 2).path != base.path
    # its own module: a mixed precision stores the frozen matrices rounded at its first pass
    mixed = dataclasses.replace(
        loaded, model=copy.deepcopy(loaded.model), precision=get_precision("bf16-mixed")
    )
    in_bf16 = load_or_compute_stats(mixed, [1], stats_config(), data, False, held_out_keys=0)[1]
    assert in_bf16.path != base.path
    only_one_file = stats_config(corpus={"files": [f"{DATA_DIR}/corpus/state-union-1945-2006.txt"]})
    alone = load_or_compute_stats(loaded, [1], only_one_file, data, False, held_out_keys=0)[1]
    assert alone.path != base.path
    # a batch size that is computed afresh agrees with the cached result
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(cache_dir.parent / "fresh"))
    fresh = run(batch_size=3)
    assert not fresh.from_cache
    assert_close_relative(fresh.second_moment, base.second_moment, 1e-6)


def test_concurrent_jobs_compute_once(tiny_llama3, cache_dir, monkeypatch):
    """The second job waits on the lock, then loads what the first one wrote."""
    loaded = tiny_llama3
    calls = spy_on_collection(monkeypatch, delay=0.5)
    cfg, data = stats_config(), data_config()
    results: dict[int, dict] = {}

    def job(index: int) -> None:
        results[index] = load_or_compute_stats(
            loaded, [0, 1], cfg, data, progress=False, held_out_keys=0
        )

    threads = [threading.Thread(target=job, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [[0, 1]]
    assert {results[0][1].from_cache, results[1][1].from_cache} == {False, True}
    for layer in (0, 1):
        assert torch.equal(results[0][layer].second_moment, results[1][layer].second_moment)
    leftovers = [path for path in cache_dir.rglob("*") if path.name.endswith(".tmp")]
    assert leftovers == []


def test_layers_are_checked_before_any_work(tiny_llama3, cache_dir, monkeypatch):
    calls = spy_on_collection(monkeypatch)
    with pytest.raises(ValueError, match="outside model"):
        load_or_compute_stats(tiny_llama3, [1, 4], stats_config(), data_config(), False)
    assert calls == []


# --- held-out keys -----------------------------------------------------------------------------


def test_held_out_keys_come_after_the_c0_sample(tiny, cache_dir):
    n_keys = 40
    cfg, data = stats_config(), data_config()
    keys = sample_keys(tiny, [0, 1], n_keys, cfg, data)
    d_k = tiny.weight(1).shape[1]
    assert keys[1].shape == (d_k, n_keys) and keys[1].dtype == torch.float32
    # by hand: the windows after the first N_TOKENS tokens, every HELD_OUT_STRIDE-th token
    first_window = -(-N_TOKENS // SEQ_LEN)
    held_out = list(
        corpus_batches(
            tiny.tokenizer,
            corpus_source(),
            SEQ_LEN,
            n_keys * HELD_OUT_STRIDE,
            4,
            first_window=first_window,
        )
    )
    expected = plain_keys(tiny, 1, held_out)[::HELD_OUT_STRIDE][:n_keys]
    torch.testing.assert_close(keys[1], expected.T)
    assert windows(tiny)[-1] != windows(tiny, SEQ_LEN, first_window)[0]

    again = sample_keys(tiny, [1], n_keys, cfg, data)
    assert torch.equal(again[1], keys[1])
    assert len(list(cache_dir.rglob("keys-layer001-*.pt"))) == 1

    with_stats = load_or_compute_stats(tiny, [1], cfg, data, progress=False, held_out_keys=n_keys)
    assert torch.equal(with_stats[1].held_out_keys, keys[1])


# --- the corpus -------------------------------------------------------------------------------


def test_windows_have_fixed_length_and_the_tokenizers_bos(tiny_llama3, tiny_gpt2):
    llama_windows = windows(tiny_llama3)
    bos = tiny_llama3.tokenizer.bos_token_id
    assert special_prefix(tiny_llama3.tokenizer) == [bos]
    assert sum(len(window) for window in llama_windows) == N_TOKENS
    assert all(len(window) == SEQ_LEN for window in llama_windows[:-1])
    assert all(window[0] == bos and bos not in window[1:] for window in llama_windows)

    gpt2_windows = windows(tiny_gpt2)
    assert special_prefix(tiny_gpt2.tokenizer) == []
    assert sum(len(window) for window in gpt2_windows) == N_TOKENS
    assert gpt2_windows[0][: SEQ_LEN - 1] == llama_windows[0][1:]  # same text, no BOS

    # window i is the same whatever n_tokens and first_window
    longer = windows(tiny_llama3, n_tokens=20 * SEQ_LEN)
    assert longer[: len(llama_windows) - 1] == llama_windows[:-1]
    assert windows(tiny_llama3, n_tokens=3 * SEQ_LEN, first_window=4) == longer[4:7]


def test_corpus_identity_tracks_file_contents(tmp_path):
    text_file = tmp_path / "a.txt"
    text_file.write_text("One paragraph.\n\nAnother one.\n")
    cfg = stats_config(corpus={"files": [str(text_file)]})
    source = CorpusSource.from_config(cfg, data_config(None))
    assert list(source.paragraphs()) == ["One paragraph.", "Another one."]
    before = source.identity()
    assert "a.txt" in before
    text_file.write_text("Different text.\n")
    os.utime(text_file, ns=(1, 1))  # a new mtime, so the memoised hash is not reused
    assert source.identity() != before


def test_corpus_from_dataset_records(monkeypatch):
    import datasets

    records = [{"text": " = Title = \n"}, {"text": "First line.\nSecond line.\n\n"}]
    seen = {}

    def fake_load_dataset(name, config, split, streaming):
        seen.update(name=name, config=config, split=split, streaming=streaming)
        return iter(records)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = stats_config(
        corpus={"dataset": "wikitext", "dataset_config": "wikitext-103-raw-v1", "split": "train"}
    )
    source = CorpusSource.from_config(cfg, data_config())  # an explicit dataset wins over data.dir
    assert list(source.paragraphs()) == ["= Title =", "First line.", "Second line."]
    assert seen == dict(
        name="wikitext", config="wikitext-103-raw-v1", split="train", streaming=True
    )
    assert "wikitext" in source.identity()
    wrong_field = stats_config(corpus={"dataset": "wikitext", "text_field": "body"})
    with pytest.raises(CorpusError, match="'body'.*fields are \\['text'\\]"):
        list(CorpusSource.from_config(wrong_field, data_config()).paragraphs())


def test_corpus_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(CorpusError, match=str(missing)):
        CorpusSource.from_config(stats_config(corpus={"files": [str(missing)]}), data_config())
    with pytest.raises(CorpusError, match=f"{tmp_path / 'corpus'}.*stats.corpus.files"):
        CorpusSource.from_config(stats_config(), data_config(str(tmp_path)))
    with pytest.raises(CorpusError, match="stats.corpus.files.*stats.corpus.dataset.*data.dir"):
        CorpusSource.from_config(stats_config(), data_config(None))


# --- editexp-stats ---------------------------------------------------------------------------


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDITEXP_CACHE_DIR": str(tmp_path / "cache"), "EDITEXP_DATA_DIR": DATA_DIR}
    command = [sys.executable, "-m", "editexp.stats_cli", "model=tiny-llama3", *overrides]
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_computes_then_loads_from_cache(tmp_path):
    overrides = ("stats.n_tokens=600", "stats.seq_len=64", "eval.held_out_keys=20")
    first = run_cli(tmp_path, "layer=[0,2]", *overrides)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("computed and cached") == 2
    assert "n_tokens=600" in first.stdout and "cond=" in first.stdout
    assert len(list((tmp_path / "cache" / "stats").rglob("c0-layer00[02]-*.pt"))) == 2

    second = run_cli(tmp_path, "layer=[0,1,2]", *overrides)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("loaded from cache") == 2
    assert "layer 1: computed and cached" in second.stdout


def test_cli_checks_layers_before_loading_the_model(tmp_path, cache_dir, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the layers were checked")

    monkeypatch.setattr(stats_cli, "load_model", must_not_load)
    for layer, message in (("[1,9]", r"layer=\[9\] is outside model 'tiny-llama3'"), ("x", "int")):
        cfg = compose_config("model=tiny-llama3", f"layer={layer}")
        with pytest.raises(ValueError, match=message):
            stats_cli.run(cfg)


def test_cli_int_layer_in_process(tiny_llama3, cache_dir, capsys):
    cfg = compose_config(
        "model=tiny-llama3", "layer=1", "stats.n_tokens=300", "eval.held_out_keys=10"
    )
    result = stats_cli.run(cfg)
    assert list(result) == [1] and result[1].n_tokens == 300
    assert result[1].held_out_keys.shape == (tiny_llama3.weight(1).shape[1], 10)
    assert "layer 1: computed and cached" in capsys.readouterr().out
