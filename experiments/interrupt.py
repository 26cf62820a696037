"""A run stopped by SIGTERM (a scheduler's pre-emption, `kill`) or Ctrl-C ends with a checkpoint, not a loss.

`StopOnSignal` turns the signal into a request: `learn` ends at the next env step (after the current PPO update
or SAC gradient step), `experiments.train` checkpoints at that step and exits with 128 + the signal's number,
saying how to continue. A second signal while waiting interrupts at once (KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import signal
import threading

from stable_baselines3.common.callbacks import BaseCallback

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(RuntimeError):
    """The run was stopped by a signal after writing a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopOnSignal(BaseCallback):
    """Ends `learn` at the next step once SIGTERM or SIGINT arrived inside `installed()`."""

    def __init__(self):
        super().__init__()
        self.received: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def _on_step(self) -> bool:
        return self.received is None

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # asked twice: stop waiting for the step to end
            raise KeyboardInterrupt
        self.received = signum

    @contextlib.contextmanager
    def installed(self):
        """The handlers are installed inside the block (main thread only: Python's rule) and restored after."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
        for signum in SIGNALS:
            signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
