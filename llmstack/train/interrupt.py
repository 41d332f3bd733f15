"""Ctrl-C during training stops at the next step boundary, never inside a step.

    with StopOnInterrupt() as stop:
        while step < max_steps and not stop.requested:
            ...                  # a whole step: forward, backward, update, log, evaluate, save
        if stop.requested:
            ...                  # save a checkpoint: a state the uninterrupted run also passed through

A KeyboardInterrupt can otherwise land anywhere: between the optimizer update and the
step counter, or after the RNG has moved on. A checkpoint saved from there does not
match any step, and the resumed run differs. So the first Ctrl-C only sets `requested`;
a second one raises KeyboardInterrupt at once (stop now, keep the last checkpoint).

The handler is installed only where Ctrl-C would raise KeyboardInterrupt (Python's
default handler, in the main thread): an ignored SIGINT (a background job) or another
program's own handler is left alone.
"""
from __future__ import annotations

import os
import signal
import threading


class StopOnInterrupt:
    def __init__(self, message: str = "Ctrl-C: stopping after this step to save a checkpoint; Ctrl-C again "
                                      "stops at once without saving"):
        self.message = message
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        os.write(2, f"\n{self.message}\n".encode())  # not print: the handler may run inside a write to stderr

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
