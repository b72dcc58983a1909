"""``python -m iqstar_lite.export RUN_DIR [key=value ...]``: the export stage (also ``iqstar-lite export``)."""

from iqstar_lite.errors import run_cli
from iqstar_lite.export.stage import main

run_cli(main)
