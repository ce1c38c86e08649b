"""``editexp-stats``: compute (or load) and cache layer statistics C0, on the run config.

    editexp-stats model=smollm2-135m layer=[0,1,2] stats.n_tokens=100000

prints, per layer, the cache file, the token count, the trace and the condition number of C0,
and whether it was computed now or read from the cache. Layers are checked against the model
before anything is loaded or computed.
"""

from __future__ import annotations

import math
import time

import hydra
import torch
from omegaconf import DictConfig

from editexp.config import CONFIG_DIR, parse_layers
from editexp.data.corpus import CorpusSource
from editexp.models import ModelSpec, load_model
from editexp.stats import LayerStats, StatsSettings, load_or_compute_stats


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
    ModelSpec.from_config(cfg.model).check_layers(layers)
    StatsSettings.from_config(cfg.stats)
    source = CorpusSource.from_config(cfg.stats, cfg.data)
    print(f"model {cfg.model.name}, layers {layers}, corpus {source.describe()}")
    start = time.perf_counter()
    loaded = load_model(cfg.model, cfg.device)
    all_stats = load_or_compute_stats(
        loaded, layers, cfg.stats, cfg.data, held_out_keys=int(cfg.eval.held_out_keys)
    )
    for layer in layers:
        print(describe(all_stats[layer]))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return all_stats


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
