"""``editexp-stats``: compute (or load) and cache layer statistics C0, on the run config.

    editexp-stats model=smollm2-135m layer=[0,1,2] stats.n_tokens=100000

prints, per layer, the cache file, the token count, the trace and the condition number of C0,
and whether it was computed now or read from the cache. The config, the layers and the corpus
are checked before anything is loaded or computed; a user error is one line on stderr and
exit status 2 (the statistics' size against d_k from the model's config and tokenizer, before
its weights load). It writes nothing but the cache (``conf/stats.yaml``: no outputs/
folder).

Before computing it prints how long the statistics take: the forward work (2 FLOPs per weight
of every layer up to the deepest requested one, per token; the pass stops there) over the
reference rates below, and after computing the rate it reached. The large models' defaults
(>= 100 tokens per key dimension, see conf/model) are docs/fidelity.md's table.
"""

from __future__ import annotations

import math
import sys
import time

import hydra
import torch
from omegaconf import DictConfig

from editexp.cli import version_text
from editexp.config import CONFIG_DIR, ConfigError, check_inputs, parse_layers
from editexp.data.corpus import CorpusSource
from editexp.errors import cli_errors
from editexp.layer_stats import LayerStats, StatsSettings, load_or_compute_stats
from editexp.models import ModelSpec, load_model, model_shape

# Forward rates (FLOP/s) to estimate from: one measured here, one assumed for a GPU.
REFERENCE_RATES = {
    "a 2-core CPU (measured: SmolLM2 layer 1 at 4,600 tokens/s)": 65e9,
    "one H100 in float32 (assumed: half its 67 TFLOP/s peak)": 33e12,
}


def forward_flops_per_token(model: torch.nn.Module, layers_module: str, deepest: int) -> float:
    """2 x the weights of layers 0..deepest: a token's forward work up to the stop (attention
    scores and the embedding lookup are left out; at seq_len 256 they are under 1%)."""
    blocks = model.get_submodule(layers_module)
    return 2.0 * sum(p.numel() for block in blocks[: deepest + 1] for p in block.parameters())


def duration(seconds: float) -> str:
    """A rough duration: "under 1 s", "about 40 s", "about 5 min", "about 2.5 h"."""
    if seconds < 1:
        return "under 1 s"
    return "about " + _rounded(seconds)


def _rounded(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate(flops_per_token: float, n_tokens: int, d_k: int) -> str:
    """How long C0 over ``n_tokens`` takes at the :data:`REFERENCE_RATES`."""
    work = flops_per_token * n_tokens
    lines = [
        f"C0 over {n_tokens:,} tokens ({n_tokens / d_k:.0f} per key dimension, d_k {d_k}): "
        f"forward work {work / 1e12:,.1f} TFLOP"
    ]
    for name, rate in REFERENCE_RATES.items():
        lines.append(f"    {duration(work / rate)} on {name}")
    return "\n".join(lines)


def condition_number(second_moment: torch.Tensor) -> float:
    """largest / smallest eigenvalue of C0 (inf when it is singular)."""
    eigenvalues = torch.linalg.eigvalsh(second_moment)
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    return largest / smallest if smallest > 0 else math.inf


def describe(stats: LayerStats) -> str:
    origin = "loaded from cache" if stats.from_cache else "computed and cached"
    return (
        f"layer {stats.layer}: {origin}: {stats.path}\n"
        f"    n_tokens={stats.n_tokens}  d_k={stats.second_moment.shape[0]}  "
        f"trace={float(stats.second_moment.trace()):.6g}  "
        f"cond={condition_number(stats.second_moment):.4g}  "
        f"held-out keys={0 if stats.held_out_keys is None else stats.held_out_keys.shape[1]}"
    )


def run(cfg: DictConfig) -> dict[int, LayerStats]:
    """Check the layers and the corpus, then load or compute the statistics and print them."""
    layers = list(parse_layers(cfg.layer))
    check_inputs(cfg)
    ModelSpec.from_config(cfg.model).check_layers(layers)
    n_tokens = StatsSettings.from_config(cfg.stats).n_tokens
    source = CorpusSource.from_config(cfg.stats, cfg.data)
    source.check()
    shape = model_shape(cfg.model, layers[0])  # its config and tokenizer, no weights
    if n_tokens < shape.d_k:
        raise ConfigError(
            f"stats.n_tokens={n_tokens} is less than d_k={shape.d_k} of model "
            f"{cfg.model.name!r}: C0 would be singular; use stats.n_tokens >= {shape.d_k}"
        )
    source.check_tokens(shape.tokenizer, shape.d_k)
    print(f"model {cfg.model.name}, layers {layers}, corpus {source.describe()}")
    start = time.perf_counter()
    loaded = load_model(cfg.model, cfg.device, cfg.get("precision"))
    settings = StatsSettings.from_config(cfg.stats)
    per_token = forward_flops_per_token(loaded.model, loaded.spec.layers_module, max(layers))
    print(estimate(per_token, settings.n_tokens, loaded.weight(layers[0]).shape[1]))
    computing = time.perf_counter()
    all_stats = load_or_compute_stats(
        loaded, layers, cfg.stats, cfg.data, held_out_keys=int(cfg.eval.held_out_keys)
    )
    seconds = time.perf_counter() - computing
    for layer in layers:
        print(describe(all_stats[layer]))
    if not all(item.from_cache for item in all_stats.values()):
        rate = settings.n_tokens / seconds
        print(
            f"computed at {rate:,.0f} tokens/s ({rate * per_token / 1e9:,.1f} GFLOP/s forward, "
            f"corpus reading and held-out keys included) on {loaded.device}"
        )
    print(f"done in {time.perf_counter() - start:.1f} s")
    return all_stats


@hydra.main(config_path=CONFIG_DIR, config_name="stats", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with cli_errors("editexp-stats"):  # exits here: Hydra would add a line of its own
        run(cfg)


def main() -> None:
    """The ``editexp-stats`` console script: user errors as one line and exit status 2."""
    if "--version" in sys.argv[1:]:
        print(version_text("editexp-stats"))
        return
    with cli_errors("editexp-stats"):
        _hydra_main()


if __name__ == "__main__":
    main()
