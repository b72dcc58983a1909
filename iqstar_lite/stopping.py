"""Stopping a run on request: SIGTERM / SIGINT finish the current step, which then saves a checkpoint and exits."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("iqstar_lite")


class StopRequest:
    """SIGTERM / SIGINT during training: the first one lets the current step finish and save a checkpoint (``requested``
    holds the signal number); a second one interrupts at once (the previous checkpoint stays)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self.at = 0.0

    def handle(self, signum, frame) -> None:
        if self.requested is not None:
            if (
                signum == self.requested and time.time() - self.at < 5
            ):  # the same signal twice at once (a launcher forwarding it)
                return
            raise KeyboardInterrupt
        self.requested, self.at = signum, time.time()
        log.warning(
            "%s: finishing this step, then saving a checkpoint (send it again to stop at once)",
            signal.Signals(signum).name,
        )


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    req = StopRequest()
    if (
        threading.current_thread() is not threading.main_thread()
    ):  # signal handlers can only be set from the main thread
        yield req
        return
    previous = {sig: signal.signal(sig, req.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield req
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
