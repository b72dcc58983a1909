"""User-facing errors: one line, what is wrong and how to fix it; the CLIs print them without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user (recipe, override, path, data). Printed as one line, exit code 2."""


class Stopped(Exception):
    """A run stopped on request (SIGTERM / SIGINT) after saving what it had; ``signum`` gives the exit code 128 + signum."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI entry point: UserError -> one line on stderr and exit 2, a requested stop -> its line and 128 + signal,
    Ctrl-C -> exit 130."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
