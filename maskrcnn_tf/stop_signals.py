"""A graceful stop of training on SIGINT (Ctrl-C) and SIGTERM (cloud preemption, Kubernetes, Slurm).

The first signal asks training to stop after the step in flight; the training monitor then saves a
checkpoint at that step, so re-running the same command resumes with nothing lost. Without this, SIGTERM
ends the process at once and every step since the last periodic checkpoint is trained again. A second
signal exits at once (status 128 + signal number) for a user who will not wait for the step. See
docs/design.md, section 16.
"""
import contextlib
import os
import signal
import sys
import threading
from typing import Iterator, Optional, Sequence

GRACEFUL_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the first caught signal: `signum` is None until then."""

    def __init__(self):
        self.signum: Optional[int] = None

    @property
    def name(self) -> Optional[str]:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"{name} again: exiting now, without a checkpoint of the step in flight", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)  # no interpreter teardown: it can hang with a live input pipeline
        self.signum = signum
        print(f"{name}: stopping after the current step and saving a checkpoint there ({name} again exits now)",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def catch_stop_signals(signals: Sequence[int] = GRACEFUL_SIGNALS) -> Iterator[StopRequest]:
    """Yields a StopRequest that the first of `signals` received inside the block sets; the previous
    handlers come back at its end. A signal the process ignores stays ignored (`nohup`, a background job
    of a non-interactive shell ignores SIGINT). Python sets handlers only in the main thread: elsewhere
    the request is never set and signals keep their usual effect."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
