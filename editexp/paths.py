"""Names built from config values that become one component of a path, and never leave it.

A model name or an override value can hold ``/`` or be ``..``; used as it is in a path, it
would put a run directory or a cache file outside its folder. Both functions here return a
single, harmless path component. No torch: the config resolvers use them.
"""

from __future__ import annotations

import hashlib

# Longer names keep their first characters and end with a hash of the whole name, far below
# the 255 bytes a file system allows for one component.
NAME_LIMIT = 100
_HASH_LENGTH = 12


def safe_name(text: str) -> str:
    """A cache file or folder name: letters, digits, ``-``, ``_`` and ``.`` kept, anything
    else ``_``; a name of dots only (``.``, ``..``) gets a leading ``_``."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))
    return f"_{name}" if name and set(name) == {"."} else name


def dir_name(text: str, limit: int = NAME_LIMIT) -> str:
    """A run or sweep directory name from override text (``layer=[4,5],lambda=10``): every
    ``/`` becomes ``_``, a name of dots only gets a leading ``_``, and a name longer than
    ``limit`` characters keeps its head and ends with a hash of the whole, so that the same
    text always gives the same, short name."""
    name = str(text).replace("/", "_").replace("\0", "_")
    if name and set(name) == {"."}:
        name = f"_{name}"
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LENGTH]
    head = name.encode()[: limit - _HASH_LENGTH - 1].decode(errors="ignore")
    return f"{head}-{digest}"
