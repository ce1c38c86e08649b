"""Layer statistics: C0 = E[k k^T] (and the mean key) at the input of the edited module.

One forward pass over the corpus collects every requested layer: a forward pre-hook on the
edited module of each layer hands its input (the keys) at the real, selected tokens to an
accumulator, and the hook of the deepest layer stops the pass, so no later layer and no
unembedding ever runs (:class:`editexp.capture.ActivationCapture`, the same hooks that read
keys at the subject for editing).

Results are cached under ``cache_root()/stats/<model>/``, one file per layer, keyed by all that
changes them (model weights, module, layer, corpus, n_tokens, seq_len, forward dtype; not the
batch size). Files are written atomically under a per-file lock: two jobs that need the same
statistics compute them once, the second waits and loads. ``sample_keys`` reuses the same
hooks and cache to return raw held-out keys K0 from the corpus windows after the C0 sample.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from editexp.cache import atomic_torch_save, cache_root, file_lock, stable_hash
from editexp.capture import ActivationCapture
from editexp.data.corpus import CorpusSource, corpus_batches
from editexp.errors import UserError
from editexp.models import DTYPE_NAMES, LoadedModel
from editexp.paths import safe_name
from editexp.precision import PRECISION_HINT, exact
from editexp.progress import on_terminal

log = logging.getLogger(__name__)

# Precision of each batch's product keys^T keys (and key sum) before it is added to the
# float64 totals. Measured on SmolLM2 layer 1 (benchmarks/stats.py, 2048 keys per batch):
# float32 products take 32 ms per batch against 68 ms in float64 (a bare forward to layer 1
# takes 170 ms, so float64 would cost C0 another ~15% of throughput; on consumer GPUs float64
# is 30-60x slower still), and they change C0 by 4e-8 relative (max and Frobenius) to the
# all-float64 result, less than the float32 forward pass itself changes the keys between two
# batch shapes (~1e-7). float32 never sums more than one batch; every sum across batches is
# float64.
BATCH_PRODUCT_DTYPE = torch.float32
# The product is computed in block rows of about this width, upper block triangle only
# (C0 is symmetric): for d_k = 1536 that is 58% of the multiply-adds of keys^T keys, and
# 32 ms per batch instead of 50 ms for the full float32 product.
_STRIP_WIDTH = 256
# Held-out keys: every 7th token of the windows after the C0 sample (7 is coprime with the
# usual power-of-two seq_len, so the sampled positions move through each window).
HELD_OUT_STRIDE = 7
_CACHE_FORMAT = 1

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class StatsError(UserError):
    """Statistics cannot be collected as configured; the message says why."""


@dataclass
class LayerStats:
    """Second moment and mean of the edited module's input at one layer, over ``n_tokens``."""

    layer: int
    second_moment: torch.Tensor  # C0 = mean over tokens of k k^T, float64 (d_k, d_k)
    mean: torch.Tensor  # mean key, float64 (d_k,)
    n_tokens: int
    path: Path | None = field(default=None, compare=False)  # cache file, when cached
    from_cache: bool = field(default=False, compare=False)
    # raw keys (d_k, N) from corpus text outside the C0 sample (see sample_keys), or None
    held_out_keys: torch.Tensor | None = field(default=None, compare=False, repr=False)


# --- collection ------------------------------------------------------------------------------


@dataclass
class _SelectedBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T), None when every position is a real token
    selected: torch.Tensor  # (B, T) bool: positions whose keys are consumed
    n_selected: int


def _select_tokens(
    batches: Iterable[Batch], n_select: int, stride: int
) -> Iterator[_SelectedBatch]:
    """Select every ``stride``-th real token (counting row by row across batches) until
    ``n_select`` are selected; rows and trailing columns with nothing selected are dropped."""
    n_real_seen = 0
    n_selected = 0
    for batch in batches:
        if n_selected >= n_select:
            return
        input_ids, attention_mask = batch if isinstance(batch, tuple | list) else (batch, None)
        real = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.bool()
        )
        index = n_real_seen + real.flatten().cumsum(0).view_as(real) - 1
        selected = real & (index % stride == 0) & (index // stride < n_select)
        n_real_seen += int(real.sum())
        count = int(selected.sum())
        if count == 0:
            continue
        n_selected += count
        rows = selected.any(dim=1)
        width = int(selected.any(dim=0).nonzero().max()) + 1
        input_ids = input_ids[rows, :width]
        selected = selected[rows, :width]
        if attention_mask is not None:
            attention_mask = attention_mask[rows, :width]
            if bool(attention_mask.bool().all()):
                attention_mask = None
        yield _SelectedBatch(input_ids, attention_mask, selected, count)


def _forward_precision(
    model: nn.Module, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """Run at ``dtype``: as is when the model holds it, with autocast for half precisions."""
    parameter = next(model.parameters())
    if dtype is None or dtype == parameter.dtype:
        return contextlib.nullcontext()
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type=parameter.device.type, dtype=dtype)
    raise StatsError(
        f"a forward pass in {dtype} needs a model loaded in {dtype} (it holds "
        f"{parameter.dtype}); float16 and bfloat16 also run on a float32 model, with autocast"
    )


@dataclass(frozen=True)
class _CapturePass:
    """One forward pass capturing the keys at the input of ``module_template.format(layer)``:
    ``n_select`` tokens, every ``stride``-th, in ``dtype`` (None: the model's own)."""

    module_template: str
    layers: list[int]
    n_select: int
    stride: int
    dtype: torch.dtype | None
    progress: bool
    unit: str  # the progress bar's unit


def _run_capture(
    model: nn.Module,
    batches: Iterable[Batch],
    spec: _CapturePass,
    consume: Callable[[int, torch.Tensor], None],
) -> int:
    """One pass over ``batches`` feeding the keys of the selected tokens to ``consume``;
    returns how many tokens were selected."""
    module_template, layers, n_select = spec.module_template, spec.layers, spec.n_select
    if not layers:
        raise StatsError("no layers requested")
    if n_select < 1:
        raise StatsError(f"asked for {n_select} tokens; need at least 1")
    modules = {layer: model.get_submodule(module_template.format(layer)) for layer in layers}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_selected = 0
    try:
        with (
            torch.inference_mode(),
            _forward_precision(model, spec.dtype),
            ActivationCapture(modules, "input", consume) as capture,
            tqdm(
                total=n_select,
                unit=spec.unit,
                unit_scale=True,
                disable=not spec.progress or not on_terminal(),
            ) as bar,
        ):
            for batch in _select_tokens(batches, n_select, spec.stride):
                mask = batch.attention_mask
                reached = capture.run(
                    model,
                    batch.selected.to(device),
                    input_ids=batch.input_ids.to(device),
                    attention_mask=None if mask is None else mask.to(device),
                )
                if not reached:
                    raise StatsError(
                        f"the forward pass never reached {module_template.format(max(layers))}"
                    )
                n_selected += batch.n_selected
                bar.update(batch.n_selected)
    finally:
        model.train(was_training)
    if n_selected == 0:
        raise StatsError("the corpus yielded no tokens")
    return n_selected


class _MomentSums:
    """float64 running sums of k and of the upper block triangle of k k^T."""

    def __init__(self, product_dtype: torch.dtype) -> None:
        self.product_dtype = product_dtype
        self.second: torch.Tensor | None = None
        self.first: torch.Tensor | None = None
        self.count = 0
        self.strips: list[tuple[int, int]] = []

    def add(self, keys: torch.Tensor) -> None:
        if self.second is None:
            d_k = keys.shape[1]
            self.second = torch.zeros(d_k, d_k, dtype=torch.float64, device=keys.device)
            self.first = torch.zeros(d_k, dtype=torch.float64, device=keys.device)
            n_strips = max(1, round(d_k / _STRIP_WIDTH))
            bounds = [round(i * d_k / n_strips) for i in range(n_strips + 1)]
            self.strips = list(zip(bounds[:-1], bounds[1:]))
        keys = keys.to(self.product_dtype)
        with exact(keys.device):  # called inside the forward's autocast: not in bfloat16
            self.first += keys.sum(dim=0)  # per batch at product_dtype, like the products
            for start, stop in self.strips:
                self.second[start:stop, start:] += keys[:, start:stop].T @ keys[:, start:]
        self.count += keys.shape[0]

    def finish(self, layer: int) -> LayerStats:
        """Mirror the upper triangle and divide by the token count (outside inference mode, so
        the tensors are ordinary ones)."""
        upper = self.second.triu()
        second_moment = (upper + upper.triu(diagonal=1).T) / self.count
        return LayerStats(layer, second_moment, self.first / self.count, self.count)


def collect_layer_stats(
    model: nn.Module,
    module_template: str,
    layers: list[int],
    batches: Iterable[Batch],
    n_tokens: int,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    product_dtype: torch.dtype = BATCH_PRODUCT_DTYPE,
) -> dict[int, LayerStats]:
    """C0 and the mean key at the input of ``module_template.format(layer)`` for each layer,
    over the first ``n_tokens`` real tokens of ``batches``, in one forward pass.

    A batch is a tensor of token ids (B, T), all real tokens, or a pair
    ``(input_ids, attention_mask)`` whose zeros mark padding (padding on the right) that is
    not counted. ``dtype`` is the forward dtype (None: the model's own).
    """
    sums = {layer: _MomentSums(product_dtype) for layer in sorted(set(layers))}

    def consume(layer: int, keys: torch.Tensor) -> None:
        sums[layer].add(keys)

    capture = _CapturePass(module_template, layers, n_tokens, 1, dtype, progress, "tok")
    _run_capture(model, batches, capture, consume)
    return {layer: layer_sums.finish(layer) for layer, layer_sums in sums.items()}


# --- configuration and caching ---------------------------------------------------------------


@dataclass(frozen=True)
class StatsSettings:
    """The typed view of the ``stats:`` config block (without the corpus)."""

    n_tokens: int
    seq_len: int
    batch_size: int

    @classmethod
    def from_config(cls, stats_cfg: Any) -> StatsSettings:
        if stats_cfg.get("dtype") is not None:
            raise StatsError(
                f"stats.dtype={stats_cfg.get('dtype')} is not a setting; the statistics' "
                f"forward pass runs in the run's precision ({PRECISION_HINT})"
            )
        settings = cls(
            n_tokens=int(stats_cfg.get("n_tokens")),
            seq_len=int(stats_cfg.get("seq_len")),
            batch_size=int(stats_cfg.get("batch_size")),
        )
        for name in ("n_tokens", "seq_len", "batch_size"):
            if getattr(settings, name) < 1:
                raise StatsError(f"stats.{name}={getattr(settings, name)} must be >= 1")
        return settings


def _cache_path(loaded: LoadedModel, kind: str, payload: dict[str, Any]) -> Path:
    model_dir = safe_name(loaded.spec.name)
    name = f"{kind}-layer{payload['layer']:03d}-{stable_hash(payload)}.pt"
    return cache_root() / "stats" / model_dir / name


def _base_payload(
    loaded: LoadedModel, layer: int, source: CorpusSource, settings: StatsSettings
) -> dict[str, Any]:
    return {
        "format": _CACHE_FORMAT,
        "model": loaded.identity,
        "module": loaded.spec.edit_module,
        "layer": layer,
        "corpus": source.identity(),
        "seq_len": settings.seq_len,
        "dtype": DTYPE_NAMES[loaded.precision.matmul_dtype],  # the forward's matmuls
    }


def _read_record(path: Path, payload: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file from another torch version, or damaged by hand
        log.warning("ignoring unreadable cache file %s (%s)", path, error)
        return None
    if not isinstance(record, dict) or record.get("payload") != payload:
        log.warning("ignoring cache file %s: it was written for other settings", path)
        return None
    problem = _record_problem(record)
    if problem is not None:
        log.warning("ignoring cache file %s: %s; computing it again", path, problem)
        return None
    return record


def _record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a cached record's tensors (C0 square and finite, the mean and the
    held-out keys of its width), or None."""
    if "keys" in record:
        keys = record["keys"]
        if not isinstance(keys, torch.Tensor) or keys.ndim != 2 or keys.shape[1] == 0:
            return "its held-out keys are not a (d_k, n) tensor"
        return None
    second, mean = record.get("second_moment"), record.get("mean")
    if not isinstance(second, torch.Tensor) or second.ndim != 2:
        return "it has no C0 matrix"
    d_k = second.shape[0]
    if second.shape != (d_k, d_k) or not bool(torch.isfinite(second).all()):
        return f"its C0 of shape {tuple(second.shape)} is not a finite square matrix"
    if not isinstance(mean, torch.Tensor) or mean.shape != (d_k,):
        return "its mean key does not match C0"
    if not isinstance(record.get("n_tokens"), int) or record["n_tokens"] < d_k:
        return f"it counts {record.get('n_tokens')!r} tokens, fewer than d_k={d_k}"
    return None


def _load_or_compute_records(
    paths: dict[int, Path],
    payloads: dict[int, dict[str, Any]],
    compute: Callable[[list[int]], dict[int, dict[str, Any]]],
) -> dict[int, tuple[dict[str, Any], bool]]:
    """Per layer, the cached record (and True) or a freshly computed one (and False).

    Layers missing from the cache are locked (in layer order, so jobs never deadlock),
    checked again (another job may have written them meanwhile), computed together by
    ``compute(layers)``, and written atomically before the locks are released.
    """
    records: dict[int, tuple[dict[str, Any], bool]] = {}
    missing = []
    for layer, path in paths.items():
        record = _read_record(path, payloads[layer])
        if record is None:
            missing.append(layer)
        else:
            records[layer] = (record, True)
    if not missing:
        return records
    with contextlib.ExitStack() as locks:
        for layer in sorted(missing):
            locks.enter_context(file_lock(paths[layer]))
        to_compute = []
        for layer in missing:
            record = _read_record(paths[layer], payloads[layer])
            if record is None:
                to_compute.append(layer)
            else:
                records[layer] = (record, True)
        if to_compute:
            for layer, record in compute(to_compute).items():
                record = {"payload": payloads[layer], **record}
                atomic_torch_save(paths[layer], record)
                records[layer] = (record, False)
    return records


def _compute_stats(
    loaded: LoadedModel,
    layers: list[int],
    source: CorpusSource,
    settings: StatsSettings,
    progress: bool,
) -> dict[int, dict[str, Any]]:
    """The cache records of C0 and the mean key of ``layers``, in one pass over the corpus."""
    log.info(
        "collecting layer statistics for layers %s over %d tokens of %s",
        layers,
        settings.n_tokens,
        source.describe(),
    )
    batches = corpus_batches(
        loaded.tokenizer, source, settings.seq_len, settings.n_tokens, settings.batch_size
    )
    with loaded.compute():  # bf16-mixed: the matmuls read the stored bfloat16 matrices
        stats = collect_layer_stats(
            loaded.model,
            loaded.spec.edit_module,
            layers,
            batches,
            settings.n_tokens,
            progress=progress,
            dtype=loaded.precision.matmul_dtype,
        )
    for layer, item in stats.items():
        d_k = item.second_moment.shape[0]
        if item.n_tokens < d_k:  # C0 would be singular: refuse it, cache nothing
            raise StatsError(
                f"the statistics corpus ({source.describe()}) gave {item.n_tokens} tokens, "
                f"fewer than d_k={d_k} at layer {layer}, so C0 would be singular; give "
                "it more text (stats.corpus.files, <data.dir>/corpus) and stats.n_tokens "
                f">= {d_k}"
            )
    return {
        layer: {
            "layer": layer,
            "second_moment": item.second_moment.cpu(),
            "mean": item.mean.cpu(),
            "n_tokens": item.n_tokens,
        }
        for layer, item in stats.items()
    }


def load_or_compute_stats(
    loaded: LoadedModel,
    layers: list[int],
    stats_cfg: Any,
    data_cfg: Any,
    progress: bool = True,
    held_out_keys: int = 256,
) -> dict[int, LayerStats]:
    """C0 and the mean key for each layer: from the cache, or computed (all missing layers in
    one pass) and cached; with ``held_out_keys`` > 0 also that many held-out keys per layer
    (``LayerStats.held_out_keys``, from :func:`sample_keys`, cached too)."""
    layers = sorted(set(int(layer) for layer in layers))
    loaded.spec.check_layers(layers)
    settings = StatsSettings.from_config(stats_cfg)
    source = CorpusSource.from_config(stats_cfg, data_cfg)
    payloads = {}
    for layer in layers:
        payload = _base_payload(loaded, layer, source, settings)
        payload.update(kind="layer-stats", n_tokens=settings.n_tokens)
        payload["batch_product"] = str(BATCH_PRODUCT_DTYPE)
        payloads[layer] = payload
    paths = {layer: _cache_path(loaded, "c0", payloads[layer]) for layer in layers}

    def compute(missing: list[int]) -> dict[int, dict[str, Any]]:
        return _compute_stats(loaded, missing, source, settings, progress)

    records = _load_or_compute_records(paths, payloads, compute)
    keys: dict[int, torch.Tensor] = {}
    if held_out_keys > 0:
        keys = sample_keys(loaded, layers, held_out_keys, stats_cfg, data_cfg)
    device = loaded.device
    return {
        layer: LayerStats(
            layer=layer,
            second_moment=records[layer][0]["second_moment"].to(device),
            mean=records[layer][0]["mean"].to(device),
            n_tokens=int(records[layer][0]["n_tokens"]),
            path=paths[layer],
            from_cache=records[layer][1],
            held_out_keys=keys.get(layer),
        )
        for layer in layers
    }


def _capture_held_out_keys(
    loaded: LoadedModel,
    layers: list[int],
    source: CorpusSource,
    settings: StatsSettings,
    n_keys: int,
    progress: bool,
) -> dict[int, dict[str, Any]]:
    """The cache records of ``n_keys`` held-out keys (d_k, n) per layer, in one pass over the
    corpus windows after the ones C0 averages over."""
    batches = corpus_batches(
        loaded.tokenizer,
        source,
        settings.seq_len,
        n_keys * HELD_OUT_STRIDE,
        settings.batch_size,
        first_window=math.ceil(settings.n_tokens / settings.seq_len),
    )
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def consume(layer: int, keys: torch.Tensor) -> None:
        chunks[layer].append(keys.to("cpu", torch.float32, copy=True))

    capture = _CapturePass(
        loaded.spec.edit_module,
        layers,
        n_keys,
        HELD_OUT_STRIDE,
        loaded.precision.matmul_dtype,
        progress,
        "key",
    )
    with loaded.compute():
        _run_capture(loaded.model, batches, capture, consume)
    return {
        layer: {"layer": layer, "keys": torch.cat(chunks[layer]).T.contiguous()} for layer in layers
    }


def sample_keys(
    loaded: LoadedModel,
    layers: list[int],
    n_keys: int,
    stats_cfg: Any,
    data_cfg: Any,
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """Up to ``n_keys`` raw keys (d_k, n) per layer, held out from the C0 sample.

    They come from the corpus windows after the ``stats.n_tokens`` tokens that C0 averages
    over: every ``HELD_OUT_STRIDE``-th token, in one early-stopped pass with the same hooks as
    the statistics, cached per layer next to them. For measuring ||Delta K0||.
    """
    layers = sorted(set(int(layer) for layer in layers))
    loaded.spec.check_layers(layers)
    if n_keys < 1:
        raise StatsError(f"asked for {n_keys} held-out keys; need at least 1")
    settings = StatsSettings.from_config(stats_cfg)
    source = CorpusSource.from_config(stats_cfg, data_cfg)
    first_window = math.ceil(settings.n_tokens / settings.seq_len)
    payloads = {}
    for layer in layers:
        payload = _base_payload(loaded, layer, source, settings)
        payload.update(
            kind="held-out-keys",
            n_keys=n_keys,
            stride=HELD_OUT_STRIDE,
            first_window=first_window,
        )
        payloads[layer] = payload
    paths = {layer: _cache_path(loaded, "keys", payloads[layer]) for layer in layers}

    def compute(missing: list[int]) -> dict[int, dict[str, Any]]:
        return _capture_held_out_keys(loaded, missing, source, settings, n_keys, progress)

    records = _load_or_compute_records(paths, payloads, compute)
    return {layer: records[layer][0]["keys"].to(loaded.device) for layer in layers}
