"""SAPO's part of a checkpoint, in safe formats: safetensors for tensors, JSON for the rest.

A ``checkpoint-N`` folder holds, beside what ``transformers.Trainer`` saves:

- ``sapo_ema.safetensors``: the float32 EMA weights;
- ``sapo_reference.safetensors``: the DPO reference weights (absent for ORPO);
- ``sapo_rank{r}.safetensors`` + ``sapo_rank{r}.json``: each rank's replay buffer (token ids,
  draw counts, insertion order), the generator states (cuts, sampling, buffer draws) and counters;
- ``sapo_run.json``: what identifies the run (loss type, world size, data and model fingerprints),
  written last, so a folder without it is not a complete checkpoint.

Modules: ``files`` (formats), ``state`` (what the trainer saves and restores, and the staged
write), ``identity`` (which run a checkpoint belongs to), ``resume`` (which checkpoint to resume).
Nothing here unpickles: loading a stranger's checkpoint cannot run code.
"""

from sapo.checkpoints.files import EMA_FILE, REFERENCE_FILE, RUN_FILE, read_json, write_json
from sapo.checkpoints.identity import check_same_run, run_identity
from sapo.checkpoints.resume import is_complete, resolve
from sapo.checkpoints.state import Progress, SAPOState, staged_checkpoint, weights_finite

__all__ = [
    "EMA_FILE",
    "REFERENCE_FILE",
    "RUN_FILE",
    "Progress",
    "SAPOState",
    "check_same_run",
    "is_complete",
    "read_json",
    "resolve",
    "run_identity",
    "staged_checkpoint",
    "weights_finite",
    "write_json",
]
