"""The :class:`Editor`: writes facts into a model, one :class:`Update` per call.

    editor = Editor.from_pretrained("smollm2-135m", algorithm="memit", layer=1)
    update = editor.edit({"prompt": "{} is in", "subject": "Wembley", "target_new": "Rome"})
    update.revert()

The Editor owns what every update of a run shares: the layer statistics C0 (factored once per
layer), the held-out corpus keys, the context prefixes, and, when a sequential run keeps
earlier edits, their keys. :func:`edit_batch` is one update of a batch of facts, for any of
the algorithms, on one or more layers.

For layers l_1 < ... < l_L (usually one), as MEMIT does:

1. values at the last layer: delta*_i for every fact (``compute_values``);
2. the target of the residual stream after l_L: z_i = z_i(before the update) + delta*_i;
3. for each layer l in order: keys K_l on the current model, residuals
   R_l = (Z - Z_current) / (number of layers still to edit), Delta_l from the algorithm's
   closed form, W_l <- W_l + Delta_l.

With one layer, step 3 uses R = delta* directly: the module's own output is where delta* was
optimised, which is exact for every architecture (Gemma-3 has a norm after its MLP, so the
residual stream there is not the module output).

A sequential run that keeps earlier edits passes its ``PastKeys`` per layer (the running sum
K_past K_past^T of earlier updates' keys): MEMIT and EMMET then preserve those keys too, and
AlphaEdit always uses them. The caller owns them and adds each update's ``keys`` afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editexp.config import ValueHparams, compose, run_settings
from editexp.data.counterfact import Fact
from editexp.editing.deltas import (
    add_to_weight,
    apply_edits,
    restore_weights,
    save_deltas,
    snapshot_weights,
)
from editexp.editing.keys import BARE_PROMPT, EditRequest, read_at_subject
from editexp.editing.linalg import CovarianceFactor, EditingError, PastKeys
from editexp.editing.plan import UpdatePlan
from editexp.editing.prefixes import context_prefixes
from editexp.editing.singular import SingularEdits, solve_singular
from editexp.editing.solvers import algorithm_of, closed_form_delta
from editexp.editing.value_cache import (
    CacheCounts,
    SweepCache,
    edited_fingerprint,
    keys_for,
    values_for,
    weights_fingerprint,
)
from editexp.editing.values import Values
from editexp.layer_stats import load_or_compute_stats
from editexp.models import LoadedModel, load_model, wrap_model
from editexp.row_edits import RankOneEdits


@dataclass
class BatchEdit:
    """What :func:`edit_batch` added to the model."""

    deltas: dict[int, torch.Tensor]  # layer -> Delta (d_v, d_k), float32, as added to W
    keys: dict[int, torch.Tensor]  # layer -> K (d_k, E), the keys it was solved for
    values: Values
    timing: dict[str, float] = field(default_factory=dict)  # keys_values, solve (seconds)


def edit_batch(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    plan: UpdatePlan,
    covariances: dict[int, CovarianceFactor],
    prefixes: Sequence[str],
    past_keys: dict[int, PastKeys] | None = None,
    cache: SweepCache | None = None,
) -> BatchEdit:
    """Write ``requests`` into the model with one update; returns the deltas it added.

    ``past_keys`` (per layer) are the earlier updates' keys to preserve (None: none kept).
    ``cache``: read and store the values and the first layer's keys in the sweep's cache
    (its fingerprint that of the weights as they are; :mod:`editexp.editing.value_cache`)."""
    record = algorithm_of(plan.algorithm)
    if record.one_fact_per_update and len(requests) != 1:
        raise EditingError(
            f"{record.title} edits one fact per update; got {len(requests)}. Edit them one at "
            "a time, or use an algorithm that edits batches (MEMIT, EMMET, AlphaEdit)."
        )
    timing = {"keys_values": 0.0, "solve": 0.0}
    start = time.perf_counter()
    last = plan.layers[-1]
    values = values_for(
        loaded, requests, prefixes, last, plan.hparams, plan.batch_size, plan.progress, cache
    )
    timing["keys_values"] += time.perf_counter() - start
    # A failed solve at a later layer must not leave the earlier layers of this update applied.
    snapshot = snapshot_weights(loaded, plan.layers[:-1])
    try:
        return _edit_layers(
            LayerWalk(loaded, requests, plan, prefixes, values, timing),
            covariances,
            past_keys,
            cache,
        )
    except BaseException:
        restore_weights(loaded, snapshot)
        raise


@dataclass
class LayerWalk:
    """One update's pieces shared by its layers: the facts, their values, the timings."""

    loaded: LoadedModel
    requests: Sequence[EditRequest]
    plan: UpdatePlan
    prefixes: Sequence[str]
    values: Values
    timing: dict[str, float]

    def residual_at_last_layer(self) -> torch.Tensor:
        """The residual stream after the last edited layer on the bare prompt, (E, d_v)."""
        last = self.plan.layers[-1]
        batch_size = self.plan.batch_size
        return read_at_subject(
            self.loaded, self.requests, BARE_PROMPT, [last], "residual", batch_size
        )[last]


def _edit_layers(
    walk: LayerWalk,
    covariances: dict[int, CovarianceFactor],
    past_keys: dict[int, PastKeys] | None,
    cache: SweepCache | None,
) -> BatchEdit:
    """Step 3 of the module docstring: keys, residuals, Delta_l and W_l += Delta_l per layer."""
    layers, timing = walk.plan.layers, walk.timing
    if len(layers) > 1:
        # UME: the target is the residual on the bare prompt plus delta*, as is h (values.outputs)
        start = time.perf_counter()
        target = walk.residual_at_last_layer() + walk.values.deltas
        timing["keys_values"] += time.perf_counter() - start
    deltas: dict[int, torch.Tensor] = {}
    all_keys: dict[int, torch.Tensor] = {}
    for position, layer in enumerate(layers):
        start = time.perf_counter()
        # Only the first layer's keys are read on the unedited model.
        layer_cache = cache if position == 0 else None
        keys = keys_for(
            walk.loaded, walk.requests, walk.prefixes, layer, walk.plan.batch_size, layer_cache
        )
        if len(layers) == 1:
            residuals = walk.values.deltas.T
        else:
            residuals = ((target - walk.residual_at_last_layer()) / (len(layers) - position)).T
        timing["keys_values"] += time.perf_counter() - start
        start = time.perf_counter()
        past = None if past_keys is None else past_keys.get(layer)
        params = walk.plan.solve_params(past)
        delta = closed_form_delta(walk.plan.algorithm, keys, residuals, covariances[layer], params)
        delta = delta.to(torch.float32)
        add_to_weight(walk.loaded, layer, delta)
        timing["solve"] += time.perf_counter() - start
        deltas[layer] = delta.cpu()
        all_keys[layer] = keys
    return BatchEdit(deltas=deltas, keys=all_keys, values=walk.values, timing=timing)


# --------------------------------------------------------------------------- the Editor


@dataclass
class Update:
    """One update that an :class:`Editor` applied to its model."""

    case_ids: list[int]  # the facts it wrote, in order
    deltas: dict[int, torch.Tensor]  # layer -> Delta (d_v, d_k), float32, as added to W
    values: Values  # v* of every fact (deltas, module outputs, losses, Adam steps)
    preservation_error: float  # ||Delta K0|| / ||W' K0|| on held-out corpus keys, over layers
    timing: dict[str, float]  # seconds: keys_values, solve
    editor: Editor = field(repr=False)
    previous: dict[int, torch.Tensor] | None = field(default=None, repr=False)  # W before
    kept_keys: dict[int, torch.Tensor] | None = field(default=None, repr=False)  # added to
    # the editor's past keys (sequential keep_edits, AlphaEdit)

    @property
    def delta_norms(self) -> dict[int, float]:
        return {layer: float(delta.norm()) for layer, delta in self.deltas.items()}

    @property
    def delta_norm(self) -> float:
        """The Frobenius norms of the deltas, summed over layers."""
        return sum(self.delta_norms.values())

    @property
    def value_steps(self) -> float:
        """Adam steps per fact of the value optimisation, on average."""
        return float(self.values.steps.float().mean())

    def revert(self) -> None:
        """Put back the edited matrices as they were before this update, bit for bit (revert
        the updates of an editor in the reverse order they were made)."""
        if self.previous is None:
            raise EditingError("this update was made with revertible=False; it cannot revert")
        restore_weights(self.editor.model, self.previous)
        for layer, keys in (self.kept_keys or {}).items():
            self.editor.past_keys[layer].remove(keys)

    def save(self, path: str | Path) -> Path:
        """The deltas and the model's identity, for :meth:`Editor.apply` on a fresh model."""
        return save_deltas(path, self.editor.model, self.deltas)


EditInput = Fact | EditRequest | Mapping[str, Any]


def as_request(item: EditInput, index: int = 0) -> EditRequest:
    """A CounterFact fact, an :class:`EditRequest`, or a dict with ``prompt`` (holding "{}"
    for the subject), ``subject``, ``target_new`` and optionally ``case_id``."""
    if isinstance(item, EditRequest):
        return _checked(item)
    if isinstance(item, Fact):
        return EditRequest(item.case_id, item.prompt, item.subject, item.target_new)
    missing = [key for key in ("prompt", "subject", "target_new") if key not in item]
    if missing or "{}" not in str(item["prompt"]):
        raise EditingError(
            f"edit request {dict(item)!r}: needs 'prompt' with a '{{}}' slot for the subject, "
            f"'subject' and 'target_new' (missing: {missing or 'the {} slot'})"
        )
    return _checked(
        EditRequest(
            int(item.get("case_id", index)), item["prompt"], item["subject"], item["target_new"]
        )
    )


def _checked(request: EditRequest) -> EditRequest:
    """A request whose subject and new target are non-empty text (an empty target would be
    "edited" into nothing)."""
    for name in ("subject", "target_new"):
        value = getattr(request, name)
        if not isinstance(value, str) or not value.strip():
            raise EditingError(
                f"edit request case_id={request.case_id}: {name}={value!r}; expected a "
                "non-empty string"
            )
    return request


class Editor:
    """Edits one model with one algorithm at fixed layers; built once, used for every update.

    ``Editor(loaded_model, cfg)`` takes a composed run config (Hydra's, or
    :func:`editexp.config.compose`'s); :meth:`from_pretrained` builds both from a model
    name, a Hugging Face id or a model already in memory, and keyword overrides.
    """

    def __init__(self, model: LoadedModel, cfg: DictConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.settings = run_settings(cfg)
        self.plan = UpdatePlan.of(self.settings, cfg.editing.batch_size)
        prefixes = cfg.editing.prefixes  # first: before a mixed precision's first pass
        self.prefixes = context_prefixes(model, prefixes.count, prefixes.length, prefixes.seed)
        start = time.perf_counter()
        stats = load_or_compute_stats(
            model,
            list(self.settings.layers),
            cfg.stats,
            cfg.data,
            held_out_keys=cfg.eval.held_out_keys,
        )
        self.covariances = {
            layer: CovarianceFactor(layer_stats.second_moment)
            for layer, layer_stats in stats.items()
        }
        self.held_out_keys = {
            layer: layer_stats.held_out_keys for layer, layer_stats in stats.items()
        }
        self.statistics_seconds = time.perf_counter() - start
        # K_past K_past^T per layer of the updates so far, when they are kept (sequential
        # keep_edits; AlphaEdit); checkpoint.pt saves it with the deltas.
        self.past_keys: dict[int, PastKeys] | None = None
        if self.settings.keep_edits:
            self.past_keys = {
                layer: PastKeys.empty(factor.dim, factor.matrix.device)
                for layer, factor in self.covariances.items()
            }
        # The sweep's value/key cache is keyed by the weights: the edited matrices as they are
        # now (the model this Editor was given) tell an unedited model apart before each
        # update; values counts those computed and read over all updates.
        self.use_cache = bool(cfg.editing.get("cache", True))
        self.values = CacheCounts()
        self._unedited = snapshot_weights(model, self.settings.layers, "cpu")
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str | LoadedModel | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        algorithm: str = "memit",
        device: str = "auto",
        modules: dict[str, Any] | None = None,
        precision: str | None = None,
        **overrides: Any,
    ) -> Editor:
        """An Editor for ``model``: a name in ``conf/model``, a Hugging Face id, a loaded
        :class:`LoadedModel`, or a ``transformers`` causal LM with its ``tokenizer`` (and
        ``modules`` for an architecture that ``conf/model`` does not know), in ``precision``
        (``32-true``, ``bf16-mixed``, ``bf16-true``, ``64-true``; None: ``32-true``, or a given
        model's own). ``overrides`` are run config keys, e.g. ``layer=[4, 5]``, ``lam=1e4``,
        ``**{"stats.n_tokens": 10**6}``."""
        if isinstance(model, PreTrainedModel):
            if tokenizer is None:
                raise EditingError("Editor.from_pretrained(model, tokenizer): pass the tokenizer")
            model = wrap_model(model, tokenizer, modules, precision)
        elif not isinstance(model, LoadedModel):
            model = load_model(model, device, precision)
        elif precision is not None and precision != model.precision.name:
            raise EditingError(
                f"precision={precision}, but the model was loaded in {model.precision.name}"
            )
        overrides = {"precision": model.precision.name, **overrides}
        return cls(model, compose(model.config, algorithm, **overrides))

    @property
    def hparams(self) -> ValueHparams:
        return self.settings.hparams

    def edit(self, facts: EditInput | Sequence[EditInput], revertible: bool = True) -> Update:
        """Write ``facts`` (one, or several for MEMIT, EMMET, AlphaEdit) into the model with one
        update.

        ``revertible`` keeps a copy of the edited matrices (on the CPU) for
        :meth:`Update.revert`.
        """
        requests = self._requests(facts)
        previous = snapshot_weights(self.model, self.settings.layers, "cpu") if revertible else None
        cache = self.sweep_cache(len(requests))
        plan = replace(self.plan, progress=len(requests) > 1)
        result = edit_batch(
            self.model, requests, plan, self.covariances, self.prefixes, self.past_keys, cache
        )
        if self.past_keys is not None:  # this update's keys are preserved by the next ones
            for layer, keys in result.keys.items():
                self.past_keys[layer].add(keys)
        return Update(
            case_ids=[request.case_id for request in requests],
            deltas=result.deltas,
            values=result.values,
            preservation_error=self.preservation_error(result.deltas),
            timing=result.timing,
            editor=self,
            previous=previous,
            kept_keys=result.keys if self.past_keys is not None else None,
        )

    def edit_singular(self, facts: Sequence[EditInput]) -> SingularEdits:
        """Each fact's own update, as if edited alone on the unedited model (singular mode),
        without writing any: values and keys of all facts in batches, each update solved
        alone as a rank-one Delta_i = r_i w_i^T (:mod:`editexp.editing.singular`). Evaluate
        them with ``Evaluator.score(facts, edits=result.edits)``."""
        settings = self.settings
        if len(settings.layers) != 1 or self.past_keys is not None:
            raise EditingError("singular edits take one layer and keep no earlier keys")
        if not self.is_unedited():
            raise EditingError("edit_singular needs the unedited model (revert updates first)")
        requests = self._requests(facts)
        (layer,) = settings.layers
        result = solve_singular(
            self.model,
            requests,
            replace(self.plan, progress=len(requests) > 1),
            self.covariances[layer],
            self.prefixes,
            self.sweep_cache(len(requests)),
        )
        result.preservation_errors = self._rank_one_preservation_errors(result.edits)
        return result

    def _requests(self, facts: EditInput | Sequence[EditInput]) -> list[EditRequest]:
        items = [facts] if isinstance(facts, Fact | EditRequest | Mapping) else list(facts)
        return [as_request(item, index) for index, item in enumerate(items)]

    def is_unedited(self, matrices: Mapping[int, torch.Tensor] | None = None) -> bool:
        """Whether the edited matrices (or ``matrices``, a CPU copy of them taken by
        :meth:`_edited_matrices`) are as this Editor found them."""
        matrices = self._edited_matrices() if matrices is None else matrices
        return all(torch.equal(matrices[layer], weight) for layer, weight in self._unedited.items())

    def _edited_matrices(self) -> dict[int, torch.Tensor]:
        """The edited layers' matrices now, on the CPU (a copy where the model is elsewhere)."""
        return {
            layer: self.model.edit_module(layer).weight.detach().cpu() for layer in self._unedited
        }

    def sweep_cache(self, n_facts: int) -> SweepCache | None:
        """The sweep's cache for an update of ``n_facts`` facts now, or None (cache off: the
        values are computed fresh and counted as computed here). It is keyed by the weights
        this Editor was given and, once it has edited them, by the edited matrices' exact
        bytes: a sequential run reads the values of another run that made the same updates
        before it (a shorter run of the same batches), and nothing else."""
        if not self.use_cache:
            self.values.computed += n_facts
            return None
        if self._fingerprint is None:
            self._fingerprint = self._unedited_fingerprint()
        matrices = self._edited_matrices()  # one copy serves the check and the hash
        if self.is_unedited(matrices):
            return SweepCache(self._fingerprint, self.values)
        return SweepCache(edited_fingerprint(self._fingerprint, matrices.values()), self.values)

    def _unedited_fingerprint(self) -> str:
        """:func:`weights_fingerprint` of the model as this Editor was given it (the edited
        matrices put back for the while, where a resumed run has applied its checkpoint)."""
        now = snapshot_weights(self.model, self.settings.layers, "cpu")
        restore_weights(self.model, self._unedited)
        try:
            # bf16-mixed: the weights as every pass uses them (the frozen matrices rounded at
            # the first), whether or not a pass has run yet (statistics read from the cache)
            with self.model.compute():
                return weights_fingerprint(self.model.model)
        finally:
            restore_weights(self.model, now)

    def _rank_one_preservation_errors(self, edits: RankOneEdits) -> list[float]:
        """:meth:`preservation_error` of every Delta_i = r_i w_i^T, as if each were applied:
        ||Delta_i K0|| / ||(W + Delta_i) K0||, from ||A + r b^T||^2 = ||A||^2 + 2 r.(A b) +
        |r|^2 |b|^2 with A = W K0 and b = K0^T w (no d_v x d_k matrix per fact)."""
        keys = self.held_out_keys.get(edits.layer)
        if keys is None or keys.numel() == 0:
            return [0.0] * len(edits)
        held = keys.double().cpu()  # (d_k, n)
        weight_keys = self.model.weight(edits.layer).detach().double().cpu() @ held  # A (d_v, n)
        left, projected = edits.left.double(), edits.right.double() @ held  # (E, d_v), b (E, n)
        left_norms, projected_norms = left.norm(dim=1), projected.norm(dim=1)
        cross = ((left @ weight_keys) * projected).sum(dim=1)  # r.(A b)
        squared = weight_keys.square().sum() + 2 * cross + (left_norms * projected_norms) ** 2
        return (left_norms * projected_norms / squared.clamp(min=0).sqrt()).tolist()

    def null_space_dims(self) -> list[int] | None:
        """AlphaEdit: the dimension r of the null space at each edited layer."""
        threshold = self.settings.nullspace_threshold
        if threshold is None:
            return None
        return [
            int(self.covariances[layer].null_space(threshold).shape[1])
            for layer in self.settings.layers
        ]

    def preservation_error(self, deltas: dict[int, torch.Tensor]) -> float:
        """||Delta K0|| / ||W K0|| over held-out corpus keys, summed over edited layers."""
        total = 0.0
        for layer, delta in deltas.items():
            keys = self.held_out_keys.get(layer)
            if keys is None or keys.numel() == 0:
                continue
            weight = self.model.weight(layer).detach().float().cpu()
            held = keys.float().cpu()
            total += float((delta @ held).norm() / (weight @ held).norm())
        return total

    def apply(self, path: str | Path, strict: bool = True) -> dict[int, torch.Tensor]:
        """Add the deltas of :meth:`Update.save` (or a run's ``deltas.pt``) to the model."""
        return apply_edits(self.model, path, strict)
