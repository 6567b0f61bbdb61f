"""Which checkpoint a run resumes from."""

from __future__ import annotations

from pathlib import Path

from sapo.checkpoints.files import RUN_FILE


def is_complete(directory: str | Path) -> bool:
    return (Path(directory) / RUN_FILE).exists()


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
