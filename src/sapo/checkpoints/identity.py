"""What identifies a run, so that resuming a checkpoint of another run fails naming the difference."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow.compute
import torch

from sapo.checkpoints.files import CheckpointError

IDENTITY_FIELDS = (
    "loss_type",
    "world_size",
    "seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "sample_every_n_steps",
    "segment_length",
    "replay_buffer_size",
)


def dataset_fingerprint(dataset) -> str:
    """A hash of the tokenized rows (their order included), cheap enough for large datasets."""
    digest = hashlib.sha256()
    table = dataset.with_format("arrow")[:]  # applies any row selection left by filter/shuffle
    for column in ("prompt_ids", "gold_ids"):
        for chunk in table.column(column).chunks:
            digest.update(pyarrow.compute.list_value_length(chunk).to_numpy(zero_copy_only=False).tobytes())
            digest.update(chunk.flatten().to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the parameter names and shapes: the same architecture gives the same value."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        shape = getattr(param, "ds_shape", param.shape)  # a ZeRO-3 partition's whole shape
        digest.update(f"{name}:{tuple(shape)};".encode())
    return digest.hexdigest()[:16]


def run_identity(args, dataset, model: torch.nn.Module) -> dict[str, Any]:
    """What must match for a checkpoint to continue a run exactly."""
    identity = {name: getattr(args, name) for name in IDENTITY_FIELDS}
    identity["dataset"] = dataset_fingerprint(dataset)
    identity["model"] = model_fingerprint(model)
    return identity


def check_same_run(directory: str | Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming the first setting in which a checkpoint's run differs
    from this one."""
    for key, value in current.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"checkpoint {directory} belongs to a different run: {key} is {saved.get(key)!r} there "
                f"and {value!r} here; resuming it would not continue that run"
            )
