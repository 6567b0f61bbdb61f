"""Ending a multi-process run cleanly.

With gloo, a process can abort at interpreter exit ("terminate called without an active
exception") when the process group is torn down while objects that hold it are still alive:
the DDP wrapper's reducer keeps a reference to the group, so destroying the group alone does
not free it, and whatever is left is destroyed in an arbitrary order at exit (how often the
two-process LoRA test aborted without this: docs/performance.md).
"""

from __future__ import annotations

import gc


def release_process_group(trainer) -> None:
    """Drop the trainer's references to distributed wrappers, collect them, then end the group.

    Registered with ``atexit`` by ``SAPOTrainer`` when it runs in several processes. The trainer
    keeps its unwrapped model (``trainer.model``), so a script may still use it afterwards.
    """
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    gc.collect()
    trainer.accelerator.state.destroy_process_group()
