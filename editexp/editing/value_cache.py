"""Values v* and keys k* on disk, shared by every grid point of a sweep that needs them.

v* of a fact depends only on the model's weights, the edited module and layer, the fact, the
value hyperparameters, the context prefixes and the code that optimises it; k* only on the
model, module, layer, prefixes, prompt and subject. Every non-sequential grid point that edits
the same fact at the same layer (ROME and MEMIT in the layer search, every lambda of the lambda
search, the nested sizes of batch scaling, the first update of every sequential run) needs the
same vectors, so they are computed once and read from here afterwards. So do sequential runs
whose updates so far were the same: a run of 256x4 needs the values its batches had in a run of
256x8, on the same edited weights.

Layout: ``<cache root>/<kind>/<model name>/layer<L>-<settings hash>/<fact hash>.pt``, one small
file per fact (a dict of tensors), ``settings.json`` naming what the settings hash covers:
the model identity and a fingerprint of its weights (a model edited or fine-tuned in memory
keeps its name), the device type (GPU and CPU round differently), the module paths, the layer,
the hyperparameters, the prefixes and a hash of the source files that compute the vectors
(:data:`CODE_MODULES`), so a changed objective never reads stale values. The fact hash covers
every field of the request (values) or prompt and subject (keys).

An edited model is told apart by :func:`edited_fingerprint`: the unedited weights'
fingerprint and the exact bytes of the edited matrices, so only the very same weights, bit for
bit, read another run's vectors (an update solved with another thread count or lambda misses,
and computes). Facts are looked up and computed chunk by
chunk under a file lock on the settings directory, so two jobs that need the same facts compute
each chunk once (the second waits, then reads); every file is written atomically.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from editexp.cache import atomic_torch_save, atomic_write_json, cache_root, file_lock, stable_hash
from editexp.config import ValueHparams
from editexp.editing.keys import EditRequest, compute_keys
from editexp.editing.values import Values, compute_values
from editexp.models import LoadedModel

log = logging.getLogger(__name__)

# The modules whose source decides the vectors: part of every settings hash.
CODE_MODULES = (
    "editexp.editing.keys",
    "editexp.editing.values",
    "editexp.capture",
    "editexp.layer_skip",
    "editexp.tokens",
)
_CODE_HASH: list[str] = []


@dataclass
class CacheCounts:
    """How many facts' vectors a run computed and how many it read from the cache."""

    computed: int = 0
    read: int = 0

    def add(self, other: CacheCounts) -> None:
        self.computed += other.computed
        self.read += other.read


@dataclass
class SweepCache:
    """How a run uses the cache for its next update: the fingerprint of the weights as they are
    now (:func:`weights_fingerprint`, or :func:`edited_fingerprint` once edited) and the counts
    of vectors computed and read so far."""

    fingerprint: str
    counts: CacheCounts


def code_hash() -> str:
    """sha256 (16 hex digits) of the source of :data:`CODE_MODULES`."""
    if not _CODE_HASH:
        sources = []
        for name in CODE_MODULES:
            module = importlib.import_module(name)
            sources.append(Path(module.__file__).read_text())
        _CODE_HASH.append(stable_hash(sources))
    return _CODE_HASH[0]


class VectorCache:
    """Per-fact entries (dicts of tensors) in one settings directory.

    ``shapes`` names every tensor of an entry and its shape (None: any); an entry that does not
    load or does not match is logged and recomputed, never used.
    """

    def __init__(
        self,
        directory: Path,
        settings: dict[str, Any],
        shapes: dict[str, tuple[int, ...] | None],
    ) -> None:
        self.directory = directory
        self.settings = settings
        self.shapes = shapes

    def entry_path(self, fact_key: str) -> Path:
        return self.directory / f"{fact_key}.pt"

    def _read(self, fact_key: str) -> dict[str, torch.Tensor] | None:
        path = self.entry_path(fact_key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            problem = self._problem(entry)
        except Exception as error:
            problem = str(error)
        if problem:
            log.warning("Recomputing the cache entry %s: %s", path, problem)
            return None
        return entry

    def _problem(self, entry: Any) -> str | None:
        if not isinstance(entry, dict) or set(entry) != set(self.shapes):
            names = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            return f"holds {names}, expected {sorted(self.shapes)}"
        for name, shape in self.shapes.items():
            tensor = entry[name]
            if not isinstance(tensor, torch.Tensor):
                return f"{name} is not a tensor"
            if shape is not None and tuple(tensor.shape) != tuple(shape):
                return f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"{name} holds NaN or Inf"
        return None

    def get_or_compute(
        self,
        fact_keys: Sequence[str],
        compute: Callable[[list[int]], list[dict[str, torch.Tensor]]],
        chunk_size: int,
        counts: CacheCounts,
    ) -> list[dict[str, torch.Tensor]]:
        """The entry of every fact, in order; ``compute(indices)`` returns the entries of the
        facts at those indices (called at most once per chunk, with the missing ones).

        A chunk whose entries are all present is read without the lock (a complete cache
        needs no write access); otherwise the lock is taken, the entries read again (another
        job may just have written them) and the missing ones computed and written.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size}; expected a positive number of facts")
        entries: list[dict[str, torch.Tensor] | None] = [None] * len(fact_keys)
        for start in range(0, len(fact_keys), chunk_size):
            chunk = list(range(start, min(start + chunk_size, len(fact_keys))))
            found = {index: self._read(fact_keys[index]) for index in chunk}
            computed: list[int] = []
            if any(entry is None for entry in found.values()):
                with file_lock(self.directory):
                    found = {
                        index: entry if entry is not None else self._read(fact_keys[index])
                        for index, entry in found.items()
                    }
                    computed = self._compute_missing(fact_keys, found, compute)
            for index, entry in found.items():
                entries[index] = entry
            counts.computed += len(computed)
            counts.read += len(chunk) - len(computed)
        return entries  # type: ignore[return-value]

    def _compute_missing(self, fact_keys, found, compute) -> list[int]:
        """Compute and write the entries missing from ``found`` (index -> entry or None);
        returns the indices computed (a fact that occurs twice is computed once)."""
        missing: dict[str, list[int]] = {}
        for index, entry in found.items():
            if entry is None:
                missing.setdefault(fact_keys[index], []).append(index)
        firsts = [positions[0] for positions in missing.values()]
        if not firsts:  # another job wrote them while this one waited for the lock
            return []
        computed = compute(firsts)
        if len(computed) != len(firsts):
            raise RuntimeError(f"compute returned {len(computed)} entries for {len(firsts)}")
        self.directory.mkdir(parents=True, exist_ok=True)
        settings_path = self.directory / "settings.json"
        if not settings_path.is_file():
            atomic_write_json(settings_path, self.settings)
        for (key, positions), entry in zip(missing.items(), computed):
            entry = {name: tensor.detach().cpu() for name, tensor in entry.items()}
            problem = self._problem(entry)
            if problem:
                raise RuntimeError(f"computed cache entry for fact {positions[0]}: {problem}")
            atomic_torch_save(self.entry_path(key), entry)
            for index in positions:
                found[index] = entry
        return firsts


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's sum and norm (float64, 9 significant digits, so that the
    summation order of another thread count does not change it)."""
    parts = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            total = float(torch.sum(parameter, dtype=torch.float64))
            norm = float(torch.linalg.vector_norm(parameter, dtype=torch.float64))
            parts.append(f"{name}:{total:.8e}:{norm:.8e}")
    return stable_hash(parts)


def edited_fingerprint(unedited: str, matrices: Iterable[torch.Tensor]) -> str:
    """The fingerprint of a model whose edited ``matrices`` changed since its weights had the
    fingerprint ``unedited``: that and a sha256 of each matrix's exact bytes."""
    digests = []
    for matrix in matrices:
        data = matrix.detach().cpu().contiguous().view(torch.uint8).numpy()
        digests.append(hashlib.sha256(data).hexdigest())  # the array's buffer, not a copy
    return stable_hash([unedited, digests])


def _settings(
    kind: str,
    loaded: LoadedModel,
    layer: int,
    prefixes: Sequence[str],
    fingerprint: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    return {
        "kind": kind,
        "model_identity": loaded.identity,
        "weights": fingerprint,
        "device_type": loaded.device.type,
        "edit_module": loaded.spec.edit_module,
        "layers_module": loaded.spec.layers_module,
        "layer": int(layer),
        "prefixes": list(prefixes),
        "code": code_hash(),
        **extra,
    }


def _cache_for(kind: str, loaded: LoadedModel, layer: int, settings: dict[str, Any], shapes):
    name = loaded.spec.name.replace("/", "--")
    directory = cache_root() / kind / name / f"layer{layer}-{stable_hash(settings)}"
    return VectorCache(directory, settings, shapes)


# The shape of each field of one fact's Values: d = the edited module's output size.
VALUE_SHAPES = {"deltas": ("d",), "outputs": ("d",), "losses": (), "steps": ()}


def value_cache(
    loaded: LoadedModel,
    layer: int,
    prefixes: Sequence[str],
    hparams: ValueHparams,
    fingerprint: str | None = None,
) -> VectorCache:
    """The cache of values at ``layer``; ``fingerprint``: of the weights as they are
    (:func:`weights_fingerprint` of the model, computed here when not given)."""
    fingerprint = fingerprint or weights_fingerprint(loaded.model)
    extra = {"hparams": asdict(hparams)}
    settings = _settings("values", loaded, layer, prefixes, fingerprint, extra)
    d_v = loaded.weight(layer).shape[0]
    shapes = {field.name: _shape(VALUE_SHAPES.get(field.name), d_v) for field in fields(Values)}
    return _cache_for("values", loaded, layer, settings, shapes)


def key_cache(
    loaded: LoadedModel, layer: int, prefixes: Sequence[str], fingerprint: str | None = None
) -> VectorCache:
    fingerprint = fingerprint or weights_fingerprint(loaded.model)
    settings = _settings("keys", loaded, layer, prefixes, fingerprint, {})
    d_k = loaded.weight(layer).shape[1]
    return _cache_for("keys", loaded, layer, settings, {"key": (d_k,)})


def _shape(symbolic: tuple | None, d: int) -> tuple[int, ...] | None:
    return None if symbolic is None else tuple(d if size == "d" else size for size in symbolic)


def value_fact_key(request: EditRequest) -> str:
    return stable_hash(asdict(request))


def key_fact_key(request: EditRequest) -> str:
    return stable_hash([request.prompt, request.subject])


def cached_values(
    cache: VectorCache,
    requests: Sequence[EditRequest],
    compute: Callable[[Sequence[EditRequest]], Values],
    chunk_size: int,
    counts: CacheCounts,
) -> Values:
    """Values of the model for ``requests``, read from ``cache`` (a
    :func:`value_cache`) where present and computed with ``compute(missing requests)``
    otherwise (then stored)."""
    names = [field.name for field in fields(Values)]

    def compute_entries(indices: list[int]) -> list[dict[str, torch.Tensor]]:
        values = compute([requests[i] for i in indices])
        return [{name: getattr(values, name)[row] for name in names} for row in range(len(indices))]

    keys = [value_fact_key(request) for request in requests]
    entries = cache.get_or_compute(keys, compute_entries, chunk_size, counts)
    return Values(**{name: torch.stack([entry[name] for entry in entries]) for name in names})


def cached_keys(
    cache: VectorCache,
    requests: Sequence[EditRequest],
    compute: Callable[[Sequence[EditRequest]], torch.Tensor],
    chunk_size: int,
    counts: CacheCounts,
) -> torch.Tensor:
    """Keys k* (d_k, E) of the model, read from ``cache`` (a :func:`key_cache`) like
    :func:`cached_values`; ``compute(requests)`` returns their keys as columns."""

    def compute_entries(indices: list[int]) -> list[dict[str, torch.Tensor]]:
        keys = compute([requests[i] for i in indices])
        return [{"key": keys[:, column]} for column in range(len(indices))]

    fact_keys = [key_fact_key(request) for request in requests]
    entries = cache.get_or_compute(fact_keys, compute_entries, chunk_size, counts)
    return torch.stack([entry["key"] for entry in entries], dim=1)


def values_for(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    layer: int,
    hparams: ValueHparams,
    batch_size: int,
    progress: bool,
    cache: SweepCache | None,
) -> Values:
    """``compute_values``, through the sweep's cache when ``cache`` is given (its fingerprint
    must be of the weights as they are)."""

    def compute(chunk: Sequence[EditRequest]) -> Values:
        return compute_values(loaded, chunk, prefixes, layer, hparams, batch_size, progress)

    if cache is None:
        return compute(requests)
    store = value_cache(loaded, layer, prefixes, hparams, cache.fingerprint)
    return cached_values(store, requests, compute, batch_size, cache.counts)


def keys_for(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    layer: int,
    batch_size: int,
    cache: SweepCache | None,
) -> torch.Tensor:
    """k* (d_k, E) at ``layer``, through the sweep's cache when ``cache`` is given (as
    :func:`values_for`; key counts are not recorded)."""

    def compute(chunk: Sequence[EditRequest]) -> torch.Tensor:
        return compute_keys(loaded, chunk, prefixes, [layer], batch_size)[layer]

    if cache is None:
        return compute(requests)
    store = key_cache(loaded, layer, prefixes, cache.fingerprint)
    return cached_keys(store, requests, compute, batch_size, CacheCounts())
