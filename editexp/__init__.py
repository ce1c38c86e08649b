"""editexp: locate-and-edit model editing experiments (ROME, MEMIT, EMMET).

``editexp.apply_edits(loaded_model, "outputs/.../deltas.pt")`` applies the edits of a finished
run to a freshly loaded model (``editexp.models.load_model``).
"""

from typing import Any

from editexp.resolvers import register as _register_resolvers

__version__ = "0.1.0"
__all__ = ["apply_edits", "load_model"]

_register_resolvers()


def __getattr__(name: str) -> Any:
    # Lazy, so that composing a config does not import torch and transformers.
    if name == "apply_edits":
        from editexp.editing.editor import apply_edits

        return apply_edits
    if name == "load_model":
        from editexp.models import load_model

        return load_model
    raise AttributeError(f"module 'editexp' has no attribute {name!r}")
