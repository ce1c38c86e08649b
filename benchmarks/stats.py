"""Layer-statistics throughput on SmolLM2-135M, against the forward passes it cannot beat.

    python benchmarks/stats.py [--model smollm2-135m] [--tokens 20480] [--repeats 3]

Over the same pre-tokenized corpus batches (seq_len 256, batch 8 by default) it times:

- C0 at layer 1 with :func:`collect_layer_stats` (float32 per-batch products, the default),
  and with float64 per-batch products;
- a bare forward pass to layer 1: the same early stop (a pre-hook on layer 1's down_proj that
  raises) and nothing accumulated; the ceiling for layer-1 statistics;
- a full-model forward pass (all layers and the logits), what statistics cost without the
  early stop;
- C0 at all layers in one pass, against an estimate of one pass per layer (bare forward to
  each layer, interpolated from the measured ones, plus one layer's accumulation each);
- the per-batch product alone on real layer-1 keys (full / upper block strips, float32 /
  float64), and how much float32 products change C0.

The machine may be shared: every timing is repeated ``--repeats`` times, interleaved, and the
best (least disturbed) and median runs are printed. Data from ``$EDITEXP_DATA_DIR`` or
``../shared/data`` next to the repository.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from editexp.config import CONFIG_DIR
from editexp.data.corpus import CorpusSource, corpus_batches
from editexp.layer_stats import collect_layer_stats
from editexp.models import LoadedModel, load_model

REPO = Path(__file__).resolve().parents[1]


class _Stop(Exception):
    pass


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def bare_forward(loaded: LoadedModel, batches: list, layer: int | None) -> None:
    """Forward every batch, stopped at ``layer``'s edited module (None: the whole model)."""
    handle = None
    if layer is not None:

        def stop(module, args):
            raise _Stop

        handle = loaded.edit_module(layer).register_forward_pre_hook(stop)
    try:
        with torch.inference_mode():
            for input_ids, attention_mask in batches:
                mask = None if bool(attention_mask.all()) else attention_mask
                try:
                    loaded.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
                except _Stop:
                    pass
    finally:
        if handle is not None:
            handle.remove()


def time_interleaved(tasks: dict[str, Callable[[], object]], repeats: int) -> dict[str, list]:
    seconds: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, task in tasks.items():
            start = time.perf_counter()
            task()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def product_timings(keys: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """The per-batch accumulation alone, on one batch of real keys (N, d_k)."""
    d_k = keys.shape[1]
    total = torch.zeros(d_k, d_k, dtype=torch.float64)
    n_strips = max(1, round(d_k / 256))
    bounds = [round(i * d_k / n_strips) for i in range(n_strips + 1)]

    def full(dtype):
        cast = keys.to(dtype)
        total.add_(cast.T @ cast)

    def strips(dtype):
        cast = keys.to(dtype)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            total[start:stop, start:] += cast[:, start:stop].T @ cast[:, start:]

    tasks = {
        "full float32": lambda: full(torch.float32),
        "full float64": lambda: full(torch.float64),
        f"{n_strips} strips float32": lambda: strips(torch.float32),
        f"{n_strips} strips float64": lambda: strips(torch.float64),
    }
    return time_interleaved(tasks, repeats * 3)


def layer1_keys(loaded: LoadedModel, batch, layer: int) -> torch.Tensor:
    captured = []

    def capture(module, args):
        captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        raise _Stop

    handle = loaded.edit_module(layer).register_forward_pre_hook(capture)
    try:
        with torch.inference_mode():
            loaded.model(input_ids=batch[0], use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def throughput(
    args: argparse.Namespace, loaded: LoadedModel, batches: list, n_tokens: int
) -> tuple[dict[str, float], dict[str, dict]]:
    """Tokens/s of C0 collection against bare forwards, interleaved; the best seconds per
    timing (in the order printed) and C0 with float32 and float64 products."""
    template, n_layers, layer = loaded.spec.edit_module, loaded.spec.n_layers, args.layer

    def stats(layers, product_dtype=torch.float32):
        return collect_layer_stats(
            loaded.model, template, layers, batches, n_tokens, False, product_dtype=product_dtype
        )

    bare_forward(loaded, batches[:1], layer)  # warm up
    results: dict[str, dict] = {}
    seconds = time_interleaved(
        {
            f"C0 layer {layer} (float32 products)": lambda: results.update(f32=stats([layer])),
            f"C0 layer {layer} (float64 products)": lambda: results.update(
                f64=stats([layer], torch.float64)
            ),
            f"bare forward to layer {layer}": lambda: bare_forward(loaded, batches, layer),
            f"bare forward to layer {n_layers - 1}": lambda: bare_forward(
                loaded, batches, n_layers - 1
            ),
            "full-model forward (with logits)": lambda: bare_forward(loaded, batches, None),
            f"C0 all {n_layers} layers, one pass": lambda: stats(list(range(n_layers))),
        },
        args.repeats,
    )
    best = {name: min(times) for name, times in seconds.items()}
    print("\nthroughput, tokens/s (best | median):")
    for name, times in seconds.items():
        print(
            f"  {name:40s} {n_tokens / best[name]:9,.0f} | "
            f"{n_tokens / statistics.median(times):9,.0f}"
        )
    return best, results


def one_pass_against_per_layer(
    best: dict[str, float], n_layers: int, layer: int, n_tokens: int
) -> None:
    """C0 against bare forwards, and all layers in one pass against one pass per layer."""
    stats1, _, bare1, bare_last, full, all_layers = best.values()
    print(f"\nC0 layer {layer} / bare forward to layer {layer}: {bare1 / stats1:.1%}")
    print(f"C0 layer {layer} vs full-model forward: {full / stats1:.1f}x faster")
    per_layer_forward = (bare_last - bare1) / (n_layers - 1 - layer)
    accumulate = stats1 - bare1
    one_at_a_time = sum(
        bare1 + (other - layer) * per_layer_forward + accumulate for other in range(n_layers)
    )
    print(
        f"all {n_layers} layers: one pass {all_layers:.1f} s "
        f"({n_tokens / all_layers:,.0f} tokens/s), one pass per layer estimated "
        f"{one_at_a_time:.1f} s: {one_at_a_time / all_layers:.1f}x slower"
    )


def product_precision(
    args: argparse.Namespace, loaded: LoadedModel, batches: list, results: dict, bare1: float
) -> None:
    """float32 against float64 per-batch products: C0's difference and the products' cost."""
    layer = args.layer
    c0_f32, c0_f64 = results["f32"][layer].second_moment, results["f64"][layer].second_moment
    difference = c0_f32 - c0_f64
    print(
        f"\nfloat32 vs float64 per-batch products at layer {layer}: "
        f"max |diff| / max |C0| = {float(difference.abs().max() / c0_f64.abs().max()):.2e}, "
        f"||diff||_F / ||C0||_F = {float(difference.norm() / c0_f64.norm()):.2e}"
    )
    keys = layer1_keys(loaded, batches[0], layer)
    print(f"per-batch accumulation alone ({keys.shape[0]} keys), ms (best | median):")
    for name, times in product_timings(keys, args.repeats).items():
        print(f"  {name:22s} {min(times) * 1e3:7.1f} | {statistics.median(times) * 1e3:7.1f}")
    bare_batch = bare1 / len(batches)
    print(f"  (bare forward to layer {layer}: {bare_batch * 1e3:.1f} ms per batch)")


def main() -> None:
    args = parse_args()
    data_dir = os.environ.get("EDITEXP_DATA_DIR") or str(REPO.parent / "shared" / "data")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", f"+data.dir={data_dir}"])
    loaded = load_model(cfg.model, "cpu")
    source = CorpusSource.from_config(cfg.stats, cfg.data)
    n_layers, layer = loaded.spec.n_layers, args.layer
    start = time.perf_counter()
    batches = list(
        corpus_batches(loaded.tokenizer, source, args.seq_len, args.tokens, args.batch_size)
    )
    tokenize_seconds = time.perf_counter() - start
    n_tokens = sum(int(mask.sum()) for _, mask in batches)
    print(
        f"model {args.model}: d_k={loaded.weight(layer).shape[1]}, {n_layers} layers; "
        f"{n_tokens} tokens as {len(batches)} batches of {args.batch_size} x {args.seq_len}; "
        f"torch threads {torch.get_num_threads()}; best / median of {args.repeats} runs"
    )
    print(f"tokenizing the corpus: {n_tokens / tokenize_seconds:,.0f} tokens/s (not in timings)")
    best, results = throughput(args, loaded, batches, n_tokens)
    one_pass_against_per_layer(best, n_layers, layer, n_tokens)
    bare1 = list(best.values())[2]
    product_precision(args, loaded, batches, results, bare1)


if __name__ == "__main__":
    main()
