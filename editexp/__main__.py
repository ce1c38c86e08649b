"""``python -m editexp``: the same as the ``editexp`` console script."""

from editexp.cli import main

main()
