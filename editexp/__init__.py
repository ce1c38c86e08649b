"""editexp: locate-and-edit model editing experiments (ROME, MEMIT, EMMET)."""

from editexp.resolvers import register as _register_resolvers

__version__ = "0.1.0"

_register_resolvers()
