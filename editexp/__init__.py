"""editexp: locate-and-edit model editing experiments."""

__version__ = "0.1.0"
