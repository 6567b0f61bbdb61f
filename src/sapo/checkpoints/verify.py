"""Whether a checkpoint folder can continue a run: every file a resume needs is there, and each is
the file that was written.

When a checkpoint is published, :func:`seal` records every file of the folder with its size and
XXH3-128 checksum under ``"files"`` in ``sapo_run.json``, which is written last. :func:`inspect`
checks a folder against that record. XXH3-128 because a 128-bit checksum catches accidental
damage (a cut, a changed byte) as well as SHA-256 does, at about ten times its speed, and
``xxhash`` is already installed with ``datasets``; files are hashed in parallel
(docs/performance.md gives the cost next to writing the checkpoint). It guards against
accidents, not tampering; against a hostile file, nothing here unpickles.

A checkpoint written before sapo recorded checksums has no ``"files"``: its files are checked
for shape only (JSON parses, a safetensors file is as long as its header says, a torch file is a
whole zip archive) and the verdict says it was not verified.
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from sapo.checkpoints.files import (
    EMA_FILE,
    REFERENCE_FILE,
    RUN_FILE,
    CheckpointError,
    rank_files,
    read_json,
    write_json,
)

CHECKSUM = "xxh3_128"
CHUNK_BYTES = 8 << 20
FILES = "files"  # the key of sapo_run.json that lists the folder's files
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


@dataclass(frozen=True)
class Verdict:
    """What :func:`inspect` found.

    Attributes:
        problem: why the folder cannot be resumed, naming the file (``None``: it can be), worded to
            follow the folder's name: "is damaged: model.safetensors is 12 bytes, 4096 were written".
        verified: whether every file matched its recorded size and checksum (``False`` for a
            checkpoint written before checksums were recorded).
    """

    problem: str | None = None
    verified: bool = False


def seal(directory: str | Path, identity: dict[str, Any]) -> None:
    """Write ``sapo_run.json``: the run's identity and every file of ``directory`` with its size
    and checksum. Call it last: a folder without this file is not a complete checkpoint."""
    write_json(Path(directory) / RUN_FILE, {**identity, FILES: file_records(directory)})


def file_records(directory: str | Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes": size, "xxh3_128": digest}}`` for every file below ``directory``
    except ``sapo_run.json`` itself."""
    directory = Path(directory)
    names = [name for name in _relative_files(directory) if name != RUN_FILE]
    digests = _checksums([directory / name for name in names])
    return {
        name: {"bytes": (directory / name).stat().st_size, CHECKSUM: digest}
        for name, digest in zip(names, digests)
    }


def inspect(directory: str | Path, world_size: int | None = None, checksums: bool = True) -> Verdict:
    """Whether ``directory`` holds a checkpoint that ``world_size`` processes can resume (``None``:
    as many as wrote it), and whether its files were verified against their checksums.
    ``checksums=False`` compares sizes only: a quick first check that reads no file whole."""
    directory = Path(directory)
    if not (directory / RUN_FILE).is_file():
        return Verdict(f"is not a complete SAPO checkpoint (no {RUN_FILE})")
    try:
        record = read_json(directory / RUN_FILE)
    except CheckpointError:
        return Verdict(f"is damaged: {RUN_FILE} is not valid JSON")
    if not isinstance(record, dict):
        return Verdict(f"is damaged: {RUN_FILE} holds no mapping")
    missing = missing_file(directory, record, world_size)
    if missing is not None:
        return Verdict(f"is not complete: {missing} is missing")
    if not checksums and record.get(FILES) is not None:
        problem = _record_problem(directory, record[FILES], checksums=False)
        return Verdict(problem and f"is damaged: {problem}", verified=False)
    listing = tuple((name, *_size_and_time(directory / name)) for name in _relative_files(directory))
    return _contents_verdict(str(directory.resolve()), listing)


@functools.lru_cache(maxsize=256)
def _contents_verdict(directory: str, listing: tuple) -> Verdict:
    """Whether each file of ``directory`` is as :func:`seal` recorded it, or, without a record,
    looks whole.

    Verifying reads every byte; a folder whose files kept their ``listing`` (names, sizes and
    modification times) since it was verified in this process is not read again.
    """
    folder = Path(directory)
    files = read_json(folder / RUN_FILE).get(FILES)
    problem = _shape_problem(folder) if files is None else _record_problem(folder, files)
    return Verdict(problem and f"is damaged: {problem}", verified=files is not None)


def missing_file(directory: str | Path, record: dict[str, Any], world_size: int | None = None) -> str | None:
    """The first file a resume by ``world_size`` processes (``None``: as many as ``record`` says
    wrote it) needs that ``directory`` lacks: weights, optimizer, scheduler, RNG states, Trainer's
    state, SAPO's state. Without them Trainer would go on from fresh state. DeepSpeed keeps weights,
    optimizer and scheduler in a ``global_step*`` folder, FSDP its sharded weights and optimizer in
    ``pytorch_model_fsdp*`` and ``optimizer_*``."""
    directory = Path(directory)
    names = set(os.listdir(directory))
    deepspeed = any(name.startswith("global_step") and (directory / name).is_dir() for name in names)
    if world_size is None:
        world_size = record.get("world_size", 1)
    world_size = world_size if isinstance(world_size, int) and world_size > 0 else 1
    needed = {
        "model.safetensors": deepspeed
        or bool(names.intersection(WEIGHT_FILES))
        or any(name.startswith("pytorch_model_fsdp") for name in names),
        "optimizer.pt": deepspeed
        or bool(names.intersection({"optimizer.pt", "optimizer.bin"}))
        or any(name.startswith("optimizer_") for name in names),
        "scheduler.pt": deepspeed or "scheduler.pt" in names,
        TRAINER_STATE: TRAINER_STATE in names,
        EMA_FILE: EMA_FILE in names,
    }
    if record.get("loss_type") == "dpo":
        needed[REFERENCE_FILE] = REFERENCE_FILE in names
    rng_files = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{r}.pth" for r in range(world_size)]
    for rank in range(world_size):
        rng_files.extend(path.name for path in rank_files(directory, rank))
    needed.update({name: name in names for name in rng_files})
    return next((name for name, present in needed.items() if not present), None)


def _record_problem(directory: Path, files: Any, checksums: bool = True) -> str | None:
    """How the folder differs from what :func:`seal` recorded, naming the first file that does
    (without ``checksums``: in presence and size only)."""
    if not isinstance(files, dict) or not all(_is_record(entry) for entry in files.values()):
        return f"{RUN_FILE} holds no valid list of files"
    for name in sorted(files):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{RUN_FILE} lists {name!r}, outside the checkpoint"
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != files[name]["bytes"]:
            return f"{name} is {size} bytes, {files[name]['bytes']} were written"
    if not checksums:
        return None
    names = sorted(files)
    for name, digest in zip(names, _checksums([directory / name for name in names])):
        if digest != files[name][CHECKSUM]:
            return f"{name} does not match its checksum (it changed after it was written)"
    return None


def _is_record(entry: Any) -> bool:
    """Whether one entry of the recorded files has a size and a checksum."""
    if not isinstance(entry, dict):
        return False
    return isinstance(entry.get("bytes"), int) and isinstance(entry.get(CHECKSUM), str)


def _shape_problem(directory: Path) -> str | None:
    """The first file of an unverifiable checkpoint that is visibly damaged: cut short or not
    parseable. Reads the JSON files and the headers of the others, not the tensors."""
    for name in _relative_files(directory):
        path = directory / name
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                problem = _safetensors_problem(path)
                if problem:
                    return f"{name} {problem}"
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path):
                    pass
        except (ValueError, zipfile.BadZipFile, OSError):  # JSONDecodeError and UnicodeDecodeError too
            return f"{name} is cut short or not a valid {path.suffix[1:]} file"
    return None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        header_length = int.from_bytes(head, "little") if len(head) == 8 else size
        if header_length > size - 8:
            return f"is cut short ({size} bytes)"
        header = json.loads(file.read(header_length))
    try:
        end = max(
            (entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0
        )
    except (KeyError, IndexError, TypeError, AttributeError):
        return "has no valid header"
    expected = 8 + header_length + end
    if size == expected:
        return None
    return f"is {'cut short: ' if size < expected else ''}{size} bytes, its header describes {expected}"


def _relative_files(directory: Path) -> list[str]:
    return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file())


def _size_and_time(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


def _checksums(paths: list[Path]) -> list[str]:
    """Each file's hex digest, several files at once (xxhash releases the GIL while it hashes)."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(_checksum, paths))


def _checksum(path: Path) -> str:
    digest = xxhash.xxh3_128()
    chunk = bytearray(CHUNK_BYTES)
    view = memoryview(chunk)
    with open(path, "rb", buffering=0) as file:
        while read := file.readinto(chunk):
            digest.update(view[:read])
    return digest.hexdigest()
