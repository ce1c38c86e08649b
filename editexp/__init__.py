"""editexp: locate-and-edit model editing experiments (ROME, MEMIT, EMMET, AlphaEdit).

From Python (see the README's "From Python")::

    from editexp import Editor, Evaluator
    editor = Editor.from_pretrained("smollm2-135m", algorithm="memit", layer=1)
    update = editor.edit({"prompt": "{} is located in", "subject": "Wembley", "target_new": "Rome"})
    Evaluator(editor.model).compare("Wembley is located in", "Rome", "London")
    update.revert()
"""

from typing import Any

import editexp.algorithms  # noqa: F401  (registers the algorithms' config defaults)
from editexp.resolvers import register as _register_resolvers

__version__ = "0.1.0"
__all__ = [
    "Editor",
    "Evaluator",
    "RunRecord",
    "apply_edits",
    "compose",
    "load_model",
    "load_results",
    "wrap_model",
]

_register_resolvers()

# Lazy, so that composing a config does not import torch and transformers.
_EXPORTS = {
    "Editor": "editexp.editing.editor",
    "apply_edits": "editexp.editing.deltas",
    "Evaluator": "editexp.evaluation.evaluator",
    "RunRecord": "editexp.record",
    "compose": "editexp.config",
    "load_model": "editexp.models",
    "load_results": "editexp.results",
    "wrap_model": "editexp.models",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'editexp' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
