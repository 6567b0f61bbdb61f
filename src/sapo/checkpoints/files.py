"""The files of SAPO's part of a checkpoint: safetensors for tensors, JSON for the rest, each
written so that a reader never sees half of it. Nothing here unpickles."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.trainer_utils import sort_checkpoints

from sapo.pairs import Pair

if TYPE_CHECKING:
    from sapo.copies.contract import CopyWeights

RUN_FILE = "sapo_run.json"
EMA_FILE = "sapo_ema.safetensors"
REFERENCE_FILE = "sapo_reference.safetensors"
PAIR_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


class CheckpointError(ValueError):
    """A checkpoint that cannot continue this run: damaged, incomplete, or another run's.

    Like bad input, it comes from what is on disk, not from a fault of sapo: the ``sapo`` command
    reports it as one ``error:`` line.
    """


@contextlib.contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Turn what a damaged file raises while it is read and its contents restored (bad JSON or
    safetensors, a missing key or file, a value of the wrong kind or shape) into a
    :class:`CheckpointError` naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except (SafetensorError, ValueError, TypeError, KeyError, IndexError, RuntimeError, OSError) as error:
        what = f"missing key {error}" if isinstance(error, KeyError) else " ".join(str(error).split())
        raise CheckpointError(f"{path}: could not be read ({what})") from error


def rank_files(directory: str | Path, rank: int) -> tuple[Path, Path]:
    directory = Path(directory)
    return directory / f"sapo_rank{rank}.safetensors", directory / f"sapo_rank{rank}.json"


# below this much free space, a write that failed without saying why failed for want of room
LOW_SPACE_BYTES = 64 << 20


@contextlib.contextmanager
def writing(what: str, folder: str | Path) -> Iterator[None]:
    """Turn a failure to write ``what`` into ``folder`` that comes from the disk (full, over quota,
    read-only) into one ``OSError`` that says so; any other failure passes unchanged.

    The writers do not agree on how they fail: Python raises ``OSError``, safetensors a
    ``SafetensorError`` quoting the OS error, ``torch.save`` a ``RuntimeError`` that names no cause
    (then the free space left on the disk tells).
    """
    try:
        yield
    except Exception as error:
        code, reason = _disk_failure(error, folder)
        if reason is None:
            raise
        raise OSError(code, f"could not write {what} in {folder}: {reason}") from error


def _disk_failure(error: Exception, folder: str | Path) -> tuple[int, str | None]:
    if isinstance(error, OSError):
        where = f": {error.filename}" if error.filename else ""
        return error.errno or errno.EIO, f"{error.strerror or error}{where}"
    if not isinstance(error, (RuntimeError, SafetensorError)):
        return 0, None
    quoted = re.search(r"\(os error (\d+)\)", str(error))
    if quoted:
        code = int(quoted.group(1))
        return code, os.strerror(code)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return 0, None
    if free < LOW_SPACE_BYTES:
        return errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free / 2**20:.1f} MiB free)"
    return 0, None


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(temporary, path)


def read_json(path: str | Path) -> dict[str, Any]:
    with reading(path):
        return json.loads(Path(path).read_text())


def buffer_to_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a ``ReplayBuffer.state_dict()`` of :class:`~sapo.pairs.Pair` items into flat tensors
    and JSON metadata."""
    items: list[Pair] = state["items"]
    tensors = {"buffer_generator_state": state["generator_state"]}
    for field in PAIR_FIELDS:
        sequences = [getattr(item, field) for item in items]
        tensors[f"buffer_{field}"] = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
        tensors[f"buffer_{field}_lengths"] = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    tensors["buffer_step"] = torch.tensor([item.step for item in items], dtype=torch.int64)
    # reference log-probs cached on a pair for one reference version (-1: none cached)
    cached = [item.reference_logps is not None for item in items]
    tensors["buffer_ref_version"] = torch.tensor(
        [item.reference_version if has else -1 for item, has in zip(items, cached)], dtype=torch.int64
    )
    tensors["buffer_ref_logps"] = torch.tensor(
        [item.reference_logps if has else (0.0, 0.0) for item, has in zip(items, cached)], dtype=torch.float64
    ).reshape(-1, 2)
    tensors["buffer_times_sampled"] = torch.tensor(state["times_sampled"], dtype=torch.int64)
    metadata = {key: state[key] for key in ("capacity", "seed")}
    return tensors, metadata


def buffer_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`buffer_to_tensors`. Checkpoints of earlier versions also hold each
    entry's insertion index (``buffer_added``, ``total_added``), which nothing reads."""
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
        item = Pair(*(columns[field][i] for field in PAIR_FIELDS), step=step)
        if ref_versions[i] >= 0:
            item.cache_reference(ref_logps[i], ref_versions[i])
        items.append(item)
    return {
        "capacity": metadata["capacity"],
        "seed": metadata["seed"],
        "items": items,
        "times_sampled": tensors["buffer_times_sampled"].tolist(),
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
        raise CheckpointError(f"checkpoint {directory} has no SAPO state for rank {rank}")
    with reading(tensor_path):
        tensors = load_file(str(tensor_path))
    return tensors, read_json(json_path)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    save_file({name: t.detach().contiguous() for name, t in tensors.items()}, str(path))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint is missing {Path(path).name}")
    with reading(path):
        return load_file(str(path))


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
    try:
        os.replace(staged, final)
    except OSError:
        if displaced is not None:
            os.replace(displaced, final)
        raise
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)


def rotate(run_dir: str | Path, limit: int | None, best_model_checkpoint: str | None) -> None:
    """Delete the oldest ``checkpoint-*`` folders beyond ``limit``, keeping the newest and the best,
    as ``transformers``' ``rotate_checkpoints`` does; but each leaves the ``checkpoint-*`` names in
    one rename before it is deleted, so a process killed meanwhile leaves no half-deleted checkpoint
    (what such a kill left is removed the next time)."""
    for leftover in Path(run_dir).glob(".deleted-checkpoint-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if not limit or limit <= 0:
        return
    folders = sort_checkpoints(str(run_dir))
    protected = {folders[-1]} if folders else set()
    if best_model_checkpoint is not None:
        protected.add(str(Path(best_model_checkpoint)))
    excess = len(folders) - max(limit, len(protected))
    for folder in [f for f in folders if f not in protected][: max(0, excess)]:
        doomed = Path(folder).with_name(f".deleted-{Path(folder).name}")
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def save_weights(copy: CopyWeights, path: str | Path, is_main_process: bool) -> None:
    """Write the EMA's or the reference's whole weights to one file; every rank must call this.

    Weights distributed across ranks (FSDP2 shards, ZeRO-3 slices) are gathered one tensor at a
    time, so the file is the same as an unsharded run's; only the main process writes it.
    """
    tensors = copy.full_tensors(keep=is_main_process)
    if is_main_process:
        save_tensors(tensors, path)


def load_weights(copy: CopyWeights, path: str | Path) -> None:
    """Inverse of :func:`save_weights`: a distributed copy keeps this rank's part of each tensor."""
    copy.load_full_tensors(load_tensors(path))
