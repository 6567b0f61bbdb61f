"""SAPO's part of a checkpoint, in safe formats: safetensors for tensors, JSON for the rest.

A ``checkpoint-N`` folder holds, beside what ``transformers.Trainer`` saves:

- ``sapo_ema.safetensors``: the float32 EMA weights;
- ``sapo_reference.safetensors``: the DPO reference weights (absent for ORPO);
- ``sapo_rank{r}.safetensors`` + ``sapo_rank{r}.json``: each rank's replay buffer (token ids,
  draw counts, insertion order), the generator states (cuts, sampling, buffer draws) and counters;
- ``sapo_run.json``: what identifies the run (loss type, world size, data and model fingerprints)
  and every file of the folder with its size and checksum, written last, so a folder without it is
  not a complete checkpoint.

Modules: ``files`` (formats), ``state`` (what the trainer saves and restores, and the staged
write), ``identity`` (which run a checkpoint belongs to), ``verify`` (whether a folder holds every
file a resume needs, each as it was written), ``resume`` (which checkpoint to resume),
``preemption`` (stopping with a checkpoint on SIGTERM or SIGINT), ``ownership`` (one run per
output folder: another run's work refused, the folder locked while a run uses it).
Nothing here unpickles: loading a stranger's checkpoint cannot run code.
"""

from sapo.checkpoints.files import (
    EMA_FILE,
    REFERENCE_FILE,
    RUN_FILE,
    CheckpointError,
    read_json,
    reading,
    rotate,
    write_json,
    writing,
)
from sapo.checkpoints.identity import check_same_run, run_identity
from sapo.checkpoints.ownership import (
    LOCK_FILE,
    OutputDirError,
    check_output_dir,
    earlier_work,
    owning_output_dir,
    write_whole,
)
from sapo.checkpoints.preemption import Preemption, stop_on_signals
from sapo.checkpoints.resume import is_complete, resolve, resolve_on_main
from sapo.checkpoints.state import (
    Progress,
    SAPOParts,
    load,
    save,
    staged_checkpoint,
    trainer_state,
    weights_finite,
)
from sapo.checkpoints.verify import inspect, seal

__all__ = [
    "EMA_FILE",
    "LOCK_FILE",
    "REFERENCE_FILE",
    "RUN_FILE",
    "CheckpointError",
    "OutputDirError",
    "Preemption",
    "Progress",
    "SAPOParts",
    "check_output_dir",
    "check_same_run",
    "earlier_work",
    "inspect",
    "is_complete",
    "load",
    "owning_output_dir",
    "read_json",
    "reading",
    "resolve",
    "resolve_on_main",
    "rotate",
    "run_identity",
    "save",
    "seal",
    "staged_checkpoint",
    "stop_on_signals",
    "trainer_state",
    "weights_finite",
    "write_whole",
    "write_json",
    "writing",
]
