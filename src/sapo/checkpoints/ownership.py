"""One owner per output folder: a run never writes over, or into, another run's work.

Two rules hold before a training run (``sapo train``, ``sapo sft``, ``sapo spin``,
``SAPOTrainer.train()``) writes anything into its ``output_dir``:

- **An earlier run's work is refused.** A run that does not continue the run in the folder
  refuses a folder holding an earlier run's checkpoints, a saved model or SPIN's iterations
  (:func:`earlier_work`), naming them and both ways on: resume that run
  (``--resume_from_checkpoint last``), or ``--overwrite_output_dir``, which removes them first
  and says what it removed. A refused run changes nothing in the folder.
- **One owner while running.** The run's main process holds an advisory lock (``flock``) on
  ``output_dir/.sapo.lock``, which names the owner (host, pid), for the whole run. A second run on
  the folder is refused at once, naming the owner, and the first is not disturbed. The
  operating system drops the lock when the process ends, however it ends: a killed run leaves
  no stale lock, and the next run (a resume, typically) takes the folder. A run that ends
  normally also removes the file. Resuming takes the lock too.

Only the main process of a multi-process run checks and locks; its verdict reaches every rank.
Both refusals are :class:`OutputDirError`, a :class:`CheckpointError`: the ``sapo`` command
reports them as one ``error:`` line with exit status 2. The lock file and other hidden entries
(``.staging``) are never counted as a run's work; the lock lives beside the checkpoints, so it is
neither inside one nor among the files ``sapo_run.json`` records.

An evaluation's single output file (``sapo eval``, ``sapo generate``) is another matter: its
command recomputes it and replaces it by design, whole (:func:`write_whole`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging

from sapo.checkpoints.files import CheckpointError

logger = logging.get_logger(__name__)

LOCK_FILE = ".sapo.lock"
# a run's numbered folders: Trainer's checkpoints and SPIN's iterations
_NUMBERED_FOLDER = re.compile(r"(checkpoint|iteration)-\d+")
_MODEL_FILES = ("config.json", "adapter_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".distcp", ".index.json")
# check_output_dir's look at the lock holds it for an instant: a run taking the lock then retries
_LOCK_TRIES, _LOCK_RETRY_SECONDS = 5, 0.05


class OutputDirError(CheckpointError):
    """``output_dir`` holds an earlier run's work that this run would write over, or another run
    is using it. Like bad input, the ``sapo`` command reports it as one ``error:`` line."""


@dataclass
class _Lock:
    """The lock this process holds on a folder (``fd`` is ``None`` on a filesystem without
    locks), and how many claims of this process share it (the command's and its trainer's)."""

    fd: int | None
    path: Path
    claims: int = 0


_held: dict[str, _Lock] = {}  # by the folder's real path


def earlier_work(output_dir: str | os.PathLike) -> list[str]:
    """What an earlier run left in ``output_dir`` that a new run would write over or mix with:
    ``checkpoint-N`` and SPIN's ``iteration-N`` folders, a saved model's config and weight files,
    and folders holding a saved model (``final/``). Names sorted, numbers in order; hidden
    entries (the lock file, ``.staging``) and logs (``pairs.jsonl``, ``runs/``) are not work."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if _NUMBERED_FOLDER.fullmatch(entry.name) or _holds_model(entry, depth=2):
                found.append(entry.name)
        elif _is_model_file(entry.name):
            found.append(entry.name)
    return sorted(found, key=lambda name: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])


def continues_run(output_dir: str | os.PathLike, resume_from_checkpoint: str | bool | None) -> bool:
    """Whether a run resuming ``resume_from_checkpoint`` continues the run in ``output_dir``:
    ``True``/``"last"``, or a checkpoint inside that folder."""
    if resume_from_checkpoint is True or resume_from_checkpoint == "last":
        return True
    if not resume_from_checkpoint:
        return False
    return Path(resume_from_checkpoint).resolve().parent == Path(output_dir).resolve()


def check_output_dir(
    output_dir: str | os.PathLike,
    resume_from_checkpoint: str | bool | None = None,
    overwrite: bool = False,
    *,
    can_resume: bool = True,
    main_process: bool = True,
) -> None:
    """Refuse, reading only, a folder that another run is using (looked at by the main process
    only: the others would see their own run's lock) or, for a run that does not continue the
    folder's run and does not ``overwrite`` it, one holding an earlier run's work.
    ``can_resume=False`` (SPIN) leaves resuming out of the message."""
    if main_process:
        _refuse_if_in_use(output_dir)
    if overwrite or continues_run(output_dir, resume_from_checkpoint):
        return
    work = earlier_work(output_dir)
    if work:
        resume = "resume that run with --resume_from_checkpoint last, or " if can_resume else ""
        raise OutputDirError(
            f"output_dir: {output_dir} holds another run's work ({_listed(work)}): {resume}pass "
            "--overwrite_output_dir to replace it, or choose another folder"
        )


@contextlib.contextmanager
def owning_output_dir(
    args,
    resume_from_checkpoint: str | bool | None = None,
    overwrite: bool = False,
    *,
    can_resume: bool = True,
) -> Iterator[None]:
    """Own ``args.output_dir`` (``args``: the run's ``TrainingArguments``) for the block:
    :func:`check_output_dir`, then the lock, then (``overwrite``) the earlier run's work removed,
    with a warning naming it; all on the main process, whose verdict every process raises.

    Within one process a folder owned already is owned again (the ``sapo`` command owns it
    around training and the final save, the trainer around ``train()``); the lock goes when the
    outermost block ends.
    """
    is_main = args.process_index == 0
    failure = None
    if is_main:
        try:
            _claim(args.output_dir, resume_from_checkpoint, overwrite, can_resume)
        except Exception as error:
            if args.world_size == 1:
                raise
            failure = error
    if args.world_size > 1:  # every process learns the main process's verdict, or none goes on
        from accelerate.utils import broadcast_object_list

        shared = broadcast_object_list([None if failure is None else str(failure)])[0]
        if failure is not None:
            raise failure
        if shared is not None:
            raise OutputDirError(shared)
    try:
        yield
    finally:
        if is_main:
            _release(args.output_dir)


def write_whole(path: str | os.PathLike, text: str) -> bool:
    """Write ``text`` to ``path`` through a temporary file renamed over it, so that a reader never
    sees half of it and two writers at once leave one whole file, not a mix; returns whether an
    earlier file was replaced. For the single files evaluations write (``sapo eval``,
    ``sapo generate``), which their command replaces by design."""
    path = Path(path)
    replaced = path.exists()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return replaced


def _claim(output_dir: str, resume_from_checkpoint, overwrite: bool, can_resume: bool) -> None:
    check_output_dir(output_dir, resume_from_checkpoint, overwrite, can_resume=can_resume)
    key = os.path.realpath(output_dir)
    lock = _held.get(key) or _lock(Path(output_dir))
    lock.claims += 1
    _held[key] = lock
    if continues_run(output_dir, resume_from_checkpoint):
        return
    try:  # again under the lock: a run may have ended here since the look above
        check_output_dir(output_dir, overwrite=overwrite, can_resume=can_resume, main_process=False)
    except OutputDirError:
        _release(output_dir)
        raise
    work = earlier_work(output_dir)
    if work:
        logger.warning(
            "overwrite_output_dir: removing the earlier run's work from %s: %s", output_dir, _listed(work)
        )
        for name in work:
            path = Path(output_dir, name)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _lock(folder: Path) -> _Lock:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    busy = 0
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            busy += 1
            if busy == _LOCK_TRIES:
                raise OutputDirError(_in_use(folder, owner)) from None
            time.sleep(_LOCK_RETRY_SECONDS)
            continue
        except OSError as error:  # a filesystem without locks (some network and FUSE mounts)
            os.close(fd)
            logger.warning(
                "%s cannot be locked (%s): a second run on this folder would not be refused", folder, error
            )
            return _Lock(None, path)
        if _is_file_at(fd, path):
            break
        os.close(fd)  # the owner that just ended removed the file: lock the one at the path now
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%F %T")})
    os.pwrite(fd, record.encode(), 0)
    os.ftruncate(fd, len(record.encode()))
    return _Lock(fd, path)


def _release(output_dir: str) -> None:
    key = os.path.realpath(output_dir)
    lock = _held[key]
    lock.claims -= 1
    if lock.claims > 0:
        return
    del _held[key]
    if lock.fd is not None:
        if _is_file_at(lock.fd, lock.path):
            lock.path.unlink()  # while still locked: whoever opened it before retries on the new file
        os.close(lock.fd)


def _refuse_if_in_use(output_dir: str | os.PathLike) -> None:
    if os.path.realpath(output_dir) in _held:
        return  # this process owns it
    try:
        fd = os.open(Path(output_dir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise OutputDirError(_in_use(output_dir, _owner(fd))) from None
    except OSError:
        pass  # no locks on this filesystem: taking the lock will warn
    finally:
        os.close(fd)


def _in_use(output_dir, owner: dict) -> str:
    who = (
        f"pid {owner['pid']} on {owner['host']}, since {owner.get('since', '?')}"
        if {"pid", "host"} <= owner.keys()
        else "its owner is starting"
    )
    return (
        f"output_dir: {output_dir} is in use by another run ({who}): wait for it to end, or choose "
        "another folder"
    )


def _owner(fd: int) -> dict:
    """The owner the lock file names; ``{}`` while it is being written."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (at_path.st_dev, at_path.st_ino) == (opened.st_dev, opened.st_ino)


def _is_model_file(name: str) -> bool:
    return name in _MODEL_FILES or name.endswith(_WEIGHT_SUFFIXES)


def _holds_model(folder: Path, depth: int) -> bool:
    """Whether ``folder`` or its subfolders, ``depth`` levels down, hold a saved model's files
    (FSDP's sharded models are a subfolder of the model's folder)."""
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file() and _is_model_file(entry.name):
            return True
        if entry.is_dir() and depth > 1 and _holds_model(entry, depth - 1):
            return True
    return False


def _listed(names: list[str]) -> str:
    """``names`` for a message, each run of three or more numbered folders as its count and ends
    (``13 checkpoints: checkpoint-3 to checkpoint-39``)."""
    numbered: dict[str, list[str]] = {}
    others = []
    for name in names:
        match = _NUMBERED_FOLDER.fullmatch(name)
        if match:
            numbered.setdefault(match.group(1), []).append(name)
        else:
            others.append(name)
    runs = [
        ", ".join(folders) if len(folders) < 3 else f"{len(folders)} {kind}s: {folders[0]} to {folders[-1]}"
        for kind, folders in numbered.items()
    ]
    return ", ".join(runs + others)
