"""editexp's Hydra launcher plugin: ``hydra/launcher=local`` (see ``launcher.py``)."""
