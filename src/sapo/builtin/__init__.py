"""What sapo ships to run offline: tiny models and a char-level tokenizer (``tiny``), exactly
checkable tasks (``tasks``) and SFT warm starts trained on them (``assets/``).

A user names them ``builtin:<name>`` wherever a model or dataset name is taken.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sapo.builtin.tiny import TINY_MODEL_SIZES

BUILTIN = "builtin:"
# checkpoints shipped as package data, each in the folder of its name under sapo/builtin/assets
BUILTIN_CHECKPOINTS = (
    "tiny-multiplication-sft",
    "tiny-long-multiplication-sft",
    "tiny-worked-multiplication-sft",
    "tiny-wide-worked-multiplication-sft",
    "tiny-sorting-sft",
    "micro-worked-multiplication-sft",
)
BUILTIN_MODELS = (*TINY_MODEL_SIZES, *BUILTIN_CHECKPOINTS)


def builtin_name(name: str) -> str | None:
    """``"tiny"`` for ``"builtin:tiny"``; ``None`` for names that are not built-in."""
    return name[len(BUILTIN) :] if name.startswith(BUILTIN) else None


def checkpoint_path(name: str) -> Path:
    """Folder of a shipped built-in checkpoint."""
    return Path(str(resources.files("sapo.builtin") / "assets" / name))
