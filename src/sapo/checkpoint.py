"""SAPO's part of a checkpoint, in safe formats: safetensors for tensors, JSON for the rest.

A ``checkpoint-N`` folder holds, beside what ``transformers.Trainer`` saves:

- ``sapo_ema.safetensors``: the float32 EMA weights;
- ``sapo_reference.safetensors``: the DPO reference weights (absent for ORPO);
- ``sapo_rank{r}.safetensors`` + ``sapo_rank{r}.json``: each rank's replay buffer (token ids,
  draw counts, insertion order), the generator states (cuts, sampling, buffer draws) and counters;
- ``sapo_run.json``: what identifies the run (loss type, world size, data and model fingerprints),
  written last, so a folder without it is not a complete checkpoint.

Nothing here unpickles: loading a stranger's checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from itertools import accumulate
from pathlib import Path
from typing import Any

import pyarrow.compute
import torch
from safetensors.torch import load_file, save_file

RUN_FILE = "sapo_run.json"
EMA_FILE = "sapo_ema.safetensors"
REFERENCE_FILE = "sapo_reference.safetensors"
PAIR_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def rank_files(directory: str | Path, rank: int) -> tuple[Path, Path]:
    directory = Path(directory)
    return directory / f"sapo_rank{rank}.safetensors", directory / f"sapo_rank{rank}.json"


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(temporary, path)


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def buffer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a ``ReplayBuffer.state_dict()`` of SAPO pairs into flat tensors and JSON metadata."""
    items = state["items"]
    tensors = {"buffer_generator_state": state["generator_state"]}
    for field in PAIR_FIELDS:
        sequences = [item[field] for item in items]
        tensors[f"buffer_{field}"] = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
        tensors[f"buffer_{field}_lengths"] = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    tensors["buffer_step"] = torch.tensor([item["step"] for item in items], dtype=torch.int64)
    # reference log-probs cached on a pair for one reference version (-1: none cached)
    tensors["buffer_ref_version"] = torch.tensor(
        [item.get("ref_version", -1) for item in items], dtype=torch.int64
    )
    tensors["buffer_ref_logps"] = torch.tensor(
        [item.get("ref_logps", (0.0, 0.0)) for item in items], dtype=torch.float64
    ).reshape(-1, 2)
    tensors["buffer_times_sampled"] = torch.tensor(state["times_sampled"], dtype=torch.int64)
    tensors["buffer_added"] = torch.tensor(state["added"], dtype=torch.int64)
    metadata = {key: state[key] for key in ("capacity", "seed", "total_added")}
    return tensors, metadata


def buffer_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`buffer_to_tensors`."""
    columns = {}
    for field in PAIR_FIELDS:
        flat = tensors[f"buffer_{field}"].tolist()
        lengths = tensors[f"buffer_{field}_lengths"].tolist()
        offsets = [0, *accumulate(lengths)][:-1]
        columns[field] = [flat[start : start + length] for start, length in zip(offsets, lengths)]
    steps = tensors["buffer_step"].tolist()
    ref_versions = tensors["buffer_ref_version"].tolist()
    ref_logps = [tuple(values) for values in tensors["buffer_ref_logps"].tolist()]
    items = []
    for i, step in enumerate(steps):
        item = {**{field: columns[field][i] for field in PAIR_FIELDS}, "step": step}
        if ref_versions[i] >= 0:
            item["ref_logps"], item["ref_version"] = ref_logps[i], ref_versions[i]
        items.append(item)
    return {
        **metadata,
        "items": items,
        "times_sampled": tensors["buffer_times_sampled"].tolist(),
        "added": tensors["buffer_added"].tolist(),
        "generator_state": tensors["buffer_generator_state"],
    }


def save_rank_state(
    directory: str | Path, rank: int, tensors: dict[str, torch.Tensor], metadata: dict
) -> None:
    tensor_path, json_path = rank_files(directory, rank)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(tensor_path))
    write_json(json_path, metadata)


def load_rank_state(directory: str | Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensor_path, json_path = rank_files(directory, rank)
    if not tensor_path.exists() or not json_path.exists():
        raise ValueError(f"checkpoint {directory} has no SAPO state for rank {rank}")
    return load_file(str(tensor_path)), read_json(json_path)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    save_file({name: t.detach().contiguous() for name, t in tensors.items()}, str(path))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    if not Path(path).exists():
        raise ValueError(f"checkpoint is missing {Path(path).name}")
    return load_file(str(path))


def save_weights(state, path: str | Path, is_main_process: bool) -> None:
    """Write the EMA's or the reference's weights to one file; every rank must call this.

    Weights sharded across ranks (FSDP2, :mod:`sapo.sharding`) are gathered whole, one tensor at a
    time, so the file is the same as an unsharded run's; only the main process writes it.
    """
    gather = getattr(state, "full_tensors", None)
    tensors = gather(keep=is_main_process) if gather is not None else state.tensors()
    if is_main_process:
        save_tensors(tensors, path)


def load_weights(state, path: str | Path) -> None:
    """Inverse of :func:`save_weights`: a sharded state keeps this rank's shard of each tensor."""
    load = getattr(state, "load_full_tensors", state.load_tensors)
    load(load_tensors(path))


def publish(staged: str | Path, final: str | Path) -> None:
    """Move a fully written checkpoint folder to its final name in one rename.

    A folder already at ``final`` (a run that re-saves a step it reached before) is moved aside
    first and removed only once the new one is in place.
    """
    staged, final = Path(staged), Path(final)
    displaced = None
    if final.exists():
        displaced = final.with_name(f".replaced-{final.name}")
        if displaced.exists():
            shutil.rmtree(displaced)
        os.replace(final, displaced)
    os.replace(staged, final)
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / RUN_FILE).exists()


def dataset_fingerprint(dataset) -> str:
    """A hash of the tokenized rows (their order included), cheap enough for large datasets."""
    digest = hashlib.sha256()
    table = dataset.with_format("arrow")[:]  # applies any row selection left by filter/shuffle
    for column in ("prompt_ids", "gold_ids"):
        for chunk in table.column(column).chunks:
            digest.update(pyarrow.compute.list_value_length(chunk).to_numpy(zero_copy_only=False).tobytes())
            digest.update(chunk.flatten().to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()[:16]


def weights_finite(model: torch.nn.Module, accelerator) -> bool:
    """Whether the weights are finite on every rank; each checks its own (under ZeRO-3 its slices)
    and every rank must call this."""
    local = all(torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in model.parameters())
    return bool(accelerator.gather(torch.tensor([float(local)], device=accelerator.device)).all())


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the parameter names and shapes: the same architecture gives the same value."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        shape = getattr(param, "ds_shape", param.shape)  # a ZeRO-3 partition's whole shape
        digest.update(f"{name}:{tuple(shape)};".encode())
    return digest.hexdigest()[:16]


def check_same_run(directory: str | Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first setting in which a checkpoint's run differs from this one."""
    for key, value in current.items():
        if saved.get(key) != value:
            raise ValueError(
                f"checkpoint {directory} belongs to a different run: {key} is {saved.get(key)!r} there "
                f"and {value!r} here; resuming it would not continue that run"
            )


def resolve(output_dir: str, requested: str | bool | None) -> str | None:
    """The checkpoint folder to resume from: ``None``, a path, or ``True``/``"last"`` for the
    newest complete ``checkpoint-N`` in ``output_dir``. Incomplete folders are never chosen."""
    if requested in (None, False):
        return None
    if requested is True or requested == "last":
        folders = Path(output_dir).glob("checkpoint-*") if Path(output_dir).is_dir() else []
        steps = sorted(
            int(f.name.split("-")[1]) for f in folders if f.name.split("-")[1].isdigit() and is_complete(f)
        )
        if not steps:
            raise ValueError(f"resume_from_checkpoint: no complete checkpoint in {output_dir}")
        return str(Path(output_dir) / f"checkpoint-{steps[-1]}")
    if not Path(requested).is_dir():
        raise ValueError(f"resume_from_checkpoint: {requested} is not a folder")
    if not is_complete(requested):
        raise ValueError(
            f"resume_from_checkpoint: {requested} is not a complete SAPO checkpoint (no {RUN_FILE})"
        )
    return str(requested)


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


def run_identity(args, dataset, model: torch.nn.Module) -> dict[str, Any]:
    """What must match for a checkpoint to continue a run exactly."""
    identity = {name: getattr(args, name) for name in IDENTITY_FIELDS}
    identity["dataset"] = dataset_fingerprint(dataset)
    identity["model"] = model_fingerprint(model)
    return identity
