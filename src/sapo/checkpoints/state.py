"""SAPO's state beside Trainer's: what a checkpoint must hold for a resumed run to continue exactly.

:func:`save` and :func:`load` write and restore the SAPO parts of a trainer (the replay buffer,
the generators of cuts and of sampling, the EMA and the reference, the generation schedule and a
few counters: :class:`SAPOParts`); the trainer owns them, this module only reads and writes them.
:func:`staged_checkpoint` writes a whole checkpoint under a temporary name and publishes it with
one rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState

from sapo.buffer import ReplayBuffer
from sapo.checkpoints.files import (
    EMA_FILE,
    REFERENCE_FILE,
    buffer_from_tensors,
    buffer_to_tensors,
    load_rank_state,
    load_weights,
    publish,
    rank_files,
    reading,
    save_rank_state,
    save_weights,
    writing,
)
from sapo.copies.contract import EMA, Reference
from sapo.sampling import Sampler
from sapo.schedule import GenerationSchedule

STAGING = ".staging"


@dataclass
class Progress:
    """SAPO's counters that are not Trainer's.

    Attributes:
        reference_version: bumped at every reference sync; cached reference log-probs carry it.
        ref_model_sync_steps: the sync interval in force (``None`` until one epoch's length is known).
    """

    reference_version: int = 0
    ref_model_sync_steps: int | None = None


class SAPOParts(Protocol):
    """The SAPO parts of a trainer that a checkpoint holds (one rank's view)."""

    buffer: ReplayBuffer
    cut_generator: torch.Generator
    sampler: Sampler
    ema: EMA
    reference: Reference | None
    schedule: GenerationSchedule
    progress: Progress


def save(parts: SAPOParts, directory: str | Path, rank: int, is_main_process: bool, global_step: int) -> None:
    """Write this rank's buffer, generators and counters, and (main process) the EMA and
    reference weights. Every rank must call this: distributed weights are gathered."""
    tensors, buffer_metadata = buffer_to_tensors(parts.buffer.state_dict())
    tensors["cut_generator_state"] = parts.cut_generator.get_state()
    tensors["sampling_generator_state"] = parts.sampler.generator.get_state()
    metadata = {
        "buffer": buffer_metadata,
        "global_step": global_step,
        "ema_updates": parts.ema.num_updates,
        "ref_model_sync_steps": parts.progress.ref_model_sync_steps,
        "reference_version": parts.progress.reference_version,
        "steps_generated_ahead": parts.schedule.steps_ahead,
    }
    save_rank_state(directory, rank, tensors, metadata)
    save_weights(parts.ema, os.path.join(directory, EMA_FILE), is_main_process)
    if parts.reference is not None:
        save_weights(parts.reference, os.path.join(directory, REFERENCE_FILE), is_main_process)


def load(parts: SAPOParts, directory: str | Path, rank: int) -> None:
    """Restore what :func:`save` wrote into ``parts``, in place."""
    tensors, metadata = load_rank_state(directory, rank)
    with reading(rank_files(directory, rank)[1]):  # a key missing from either file
        parts.buffer.load_state_dict(buffer_from_tensors(tensors, metadata["buffer"]))
        parts.cut_generator.set_state(tensors["cut_generator_state"])
        parts.sampler.generator.set_state(tensors["sampling_generator_state"])
        parts.ema.num_updates = metadata["ema_updates"]
        parts.progress.ref_model_sync_steps = metadata["ref_model_sync_steps"]
        parts.progress.reference_version = metadata["reference_version"]
        parts.schedule.restore(metadata["steps_generated_ahead"])
    load_weights(parts.ema, os.path.join(directory, EMA_FILE))
    if parts.reference is not None:
        load_weights(parts.reference, os.path.join(directory, REFERENCE_FILE))


@contextlib.contextmanager
def staged_checkpoint(
    run_dir: str, name: str, is_main_process: bool, wait_for_everyone: Callable[[], None]
) -> Iterator[str]:
    """The folder to write checkpoint ``name`` into; published as ``run_dir/name`` when the block ends.

    A process killed at any moment leaves either the complete new checkpoint or none, and the
    previous ones untouched. A staged folder left by a run killed while saving is removed first.
    If the block raises (a full disk, a second Ctrl-C), nothing is published and the staged
    folder is removed; a failure that comes from the disk is raised as one ``OSError`` saying so.
    """
    staged = os.path.join(run_dir, STAGING, name)
    if is_main_process and os.path.exists(staged):
        shutil.rmtree(staged)
    wait_for_everyone()
    try:
        with writing(name, run_dir):
            yield staged
            wait_for_everyone()
            if is_main_process:
                publish(staged, os.path.join(run_dir, name))
    finally:
        if is_main_process:
            shutil.rmtree(staged, ignore_errors=True)  # gone already once published
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(staged))
    wait_for_everyone()


def trainer_state(directory: str | Path) -> TrainerState:
    """Trainer's state saved in checkpoint ``directory``; a damaged file is a ``CheckpointError``."""
    path = os.path.join(directory, TRAINER_STATE_NAME)
    with reading(path):
        return TrainerState.load_from_json(path)


def weights_finite(model: torch.nn.Module, accelerator) -> bool:
    """Whether the weights are finite on every rank; each checks its own (under ZeRO-3 its slices)
    and every rank must call this."""
    local = all(torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in model.parameters())
    return bool(accelerator.gather(torch.tensor([float(local)], device=accelerator.device)).all())
