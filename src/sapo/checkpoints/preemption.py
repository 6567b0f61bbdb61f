"""Stopping a run with a checkpoint when it is asked to: SIGTERM (what Slurm and Kubernetes send
before SIGKILL) and SIGINT (Ctrl-C).

Inside :func:`stop_on_signals` a signal handler only records the signal. :class:`Preemption`, a
``TrainerCallback``, lets the current optimizer step finish (generation included), has Trainer
write a checkpoint at its end (staged and published whole, like every checkpoint) and stops
training; a signal that arrives while a checkpoint is being written lets that write finish and
stops right after it. Resuming that checkpoint continues the run exactly. The caller then exits
with :attr:`Preemption.exit_code`, 128 + the signal's number (143 for SIGTERM, 130 for SIGINT):
the status a shell reports for a process a signal ended, which job scripts test to requeue.

A second SIGINT stops at once (``KeyboardInterrupt``; a checkpoint being written is discarded).
Later SIGTERMs are ignored: wrapper scripts and schedulers may deliver the same one twice, and
SIGKILL stays the scheduler's last word. Under several processes the ranks agree at every step end
(one all-reduce of a flag), so that all of them stop after the same step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence

import torch
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption(TrainerCallback):
    """Checkpoints and stops training after the optimizer step during which a signal arrived.

    Attributes:
        received: the number of the first signal received, or ``None``.
        stopped_at: the step training stopped after, its checkpoint written (``None``: training
            was not cut short; a signal during the last step still gets its checkpoint).
    """

    def __init__(self):
        self.received: int | None = None
        self.stopped_at: int | None = None

    @property
    def exit_code(self) -> int:
        """128 + the signal's number when training was cut short, else 0."""
        return 0 if self.stopped_at is None or self.received is None else 128 + self.received

    def describe(self, output_dir: str) -> str:
        """One line for the user: what stopped the run and which checkpoint holds it."""
        name = signal.Signals(self.received).name
        folder = os.path.join(output_dir, f"checkpoint-{self.stopped_at}")
        return f"stopped by {name} after step {self.stopped_at}: resume the run from {folder}"

    def handle(self, signum: int, frame) -> None:
        """The signal handler: records the signal and nothing else (it runs between two bytecodes
        of whatever the main thread is doing)."""
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self._asked(args):
            control.should_save = True
            control.should_training_stop = True
            self._stop(state, f"writing checkpoint-{state.global_step}, then stopping")

    def on_save(self, args, state, control, **kwargs):
        if not control.should_training_stop and self._asked(args):  # it came during that write
            control.should_training_stop = True
            self._stop(state, f"checkpoint-{state.global_step} is written, stopping")

    def _asked(self, args) -> bool:
        """Whether any rank received a signal; each rank then knows which one (the largest number)."""
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            received = torch.tensor([self.received or 0], device=args.device)
            torch.distributed.all_reduce(received, op=torch.distributed.ReduceOp.MAX)
            self.received = self.received or int(received.item()) or None
        return self.received is not None

    def _stop(self, state, what: str) -> None:
        if state.global_step < state.max_steps:
            self.stopped_at = state.global_step
        logger.warning("%s received: %s", signal.Signals(self.received).name, what)


@contextlib.contextmanager
def stop_on_signals(trainer, signals: Sequence[int] = SIGNALS) -> Iterator[Preemption]:
    """Within the block, ``signals`` make ``trainer`` checkpoint and stop after the current optimizer
    step; the block yields the :class:`Preemption` that records it. The previous handlers are back
    when the block ends, however it ends.

        with stop_on_signals(trainer) as stop:
            trainer.train()
        if stop.stopped_at is not None:
            sys.exit(stop.exit_code)

    Handlers can only be installed from the main thread; elsewhere a warning says signals keep
    their previous effect.
    """
    preemption = Preemption()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in signals:
            previous[signum] = signal.signal(signum, preemption.handle)
    else:
        logger.warning("stop_on_signals: not in the main thread, signals keep their previous effect")
    trainer.add_callback(preemption)
    try:
        yield preemption
    finally:
        trainer.remove_callback(preemption)
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
