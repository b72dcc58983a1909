"""``python -m iqstar_lite COMMAND ...``: the console script ``iqstar-lite`` (``cli.py``)."""

from iqstar_lite.cli import cli

cli()
