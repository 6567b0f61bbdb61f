"""Which checkpoint a run resumes from: the one named, or the newest that verifies."""

from __future__ import annotations

from pathlib import Path

from transformers.utils import logging

from sapo.checkpoints.files import CheckpointError
from sapo.checkpoints.verify import Verdict, inspect

logger = logging.get_logger(__name__)


def is_complete(directory: str | Path, world_size: int | None = None) -> bool:
    """Whether ``directory`` is a checkpoint a run can resume (see :func:`inspect`)."""
    return Path(directory).is_dir() and inspect(directory, world_size).problem is None


def resolve(
    output_dir: str, requested: str | bool | None, world_size: int | None = None, checksums: bool = True
) -> str | None:
    """The checkpoint folder ``world_size`` processes resume from (``None``: as many as wrote
    it): ``None``, a path, or ``True``/``"last"`` for the newest ``checkpoint-N`` in
    ``output_dir`` that verifies. ``checksums=False`` makes it a quick check, file sizes only
    (see :func:`inspect`), for a process that is not the one that verifies.

    ``"last"`` warns once for each newer folder it skips, naming the file and what is wrong with
    it. A folder named explicitly that does not verify, or no folder that does, is a
    :class:`CheckpointError`. A checkpoint written before checksums were recorded is taken with
    one warning that it could not be verified.
    """
    if requested in (None, False):
        return None
    if requested is True or requested == "last":
        return _newest_that_verifies(Path(output_dir), world_size, checksums)
    if not Path(requested).is_dir():
        raise CheckpointError(f"resume_from_checkpoint: {requested} is not a folder")
    verdict = inspect(requested, world_size, checksums)
    if verdict.problem is not None:
        raise CheckpointError(f"resume_from_checkpoint: {requested} {verdict.problem}")
    _warn_if_unverified(requested, verdict, checksums)
    return str(requested)


def resolve_on_main(output_dir: str, requested: str | bool | None, accelerator) -> str | None:
    """:func:`resolve` on the main process only (verifying reads every byte of a checkpoint), its
    answer or its error shared with every process."""
    if accelerator.num_processes == 1:
        return resolve(output_dir, requested, 1)
    from accelerate.utils import broadcast_object_list

    answer: list = [None]
    if accelerator.is_main_process:
        try:
            answer = [("path", resolve(output_dir, requested, accelerator.num_processes))]
        except CheckpointError as error:
            answer = [("error", str(error))]
    kind, value = broadcast_object_list(answer)[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


def _newest_that_verifies(output_dir: Path, world_size: int | None, checksums: bool) -> str:
    folders = output_dir.glob("checkpoint-*") if output_dir.is_dir() else []
    numbered = [f for f in folders if f.is_dir() and f.name.split("-", 1)[1].isdigit()]
    skipped = []
    for folder in sorted(numbered, key=lambda f: int(f.name.split("-", 1)[1]), reverse=True):
        verdict = inspect(folder, world_size, checksums)
        if verdict.problem is None:
            _warn_if_unverified(folder, verdict, checksums)
            return str(folder)
        logger.warning_once(f"resume_from_checkpoint='last': skipping {folder}: it {verdict.problem}")
        skipped.append(folder.name)
    passed_over = f" ({', '.join(skipped)}: see the warnings above)" if skipped else ""
    raise CheckpointError(f"resume_from_checkpoint: no complete checkpoint in {output_dir}{passed_over}")


def _warn_if_unverified(folder: str | Path, verdict: Verdict, checksums: bool) -> None:
    if checksums and not verdict.verified:
        logger.warning_once(
            f"{folder} was written without checksums (by an earlier sapo): it could not be verified; "
            "resuming it as it is"
        )
