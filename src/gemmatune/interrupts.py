"""SIGINT / SIGTERM during training: finish the current step, save a checkpoint, stop cleanly.

Preemptible machines and schedulers send SIGTERM some seconds before the kill; a user presses
Ctrl-C. Either way the run should lose nothing: the first signal asks the Trainer (through
`control`) to save at the next optimizer-step boundary and stop; `train()` then returns without
the final evaluation and the CLI prints the command that resumes. A second signal means "now":
the original handlers are put back and KeyboardInterrupt raised, and the checkpoint in flight, if
any, is discarded whole by the atomic save (the previous one stays).
"""

from __future__ import annotations

import logging
import signal
import threading

from transformers import TrainerCallback

log = logging.getLogger("gemmatune")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal(TrainerCallback):
    """Use as a context manager around `trainer.train()`, and add it to the trainer's callbacks."""

    def __init__(self):
        self.received: str | None = None  # name of the first signal, e.g. "SIGTERM"
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s: saving a checkpoint after this step, then stopping (send it again to stop at once)",
                    self.received)

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
