"""Console output of the command-line entry points: log lines with a time stamp, the libraries quiet."""

from __future__ import annotations

import logging
import os


def setup_logging() -> None:
    """The package's log lines (INFO on the main process, warnings on the others) with a time stamp; the libraries' quiet."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("transformers", "accelerate", "bitsandbytes", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
