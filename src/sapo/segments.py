"""Where a segment is cut from the gold response, and how the rejected answer is spliced.

SAPO builds a rejected answer by letting the EMA model rewrite one window of the gold answer:
``rejected = gold[:cut] + segment + gold[cut + L:]``. These functions are pure (ids in, ids out)
so the rule can be tested on its own; the trainer only composes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def segment_window(gold_length: int, segment_length: int) -> int:
    """Number of gold tokens the segment replaces: ``min(segment_length, gold_length)``."""
    if segment_length <= 0:
        raise ValueError(f"segment_length must be positive, got {segment_length}")
    return min(segment_length, gold_length)


def sample_cut(
    prompt_length: int,
    gold_length: int,
    segment_length: int,
    max_length: int | None,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Draw the cut point for one row.

    Returns ``(cut, window)`` where ``window = min(segment_length, gold_length)`` and ``cut`` is
    uniform over ``[0, gold_length - window]``, further capped so that
    ``prompt_length + cut + window <= max_length`` (the segment must fit the model's length
    budget). A gold answer no longer than ``segment_length`` is regenerated whole (``cut = 0``).
    """
    window = segment_window(gold_length, segment_length)
    highest = gold_length - window
    if max_length is not None:
        highest = min(highest, max_length - prompt_length - window)
    highest = max(highest, 0)
    cut = int(torch.randint(0, highest + 1, (1,), generator=generator).item())
    return cut, window


def _as_set(eos_token_id: int | Iterable[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return set(eos_token_id)


def splice(
    gold_ids: Sequence[int],
    cut: int,
    segment_ids: Sequence[int],
    segment_length: int,
    eos_token_id: int | Iterable[int] | None,
) -> list[int]:
    """Build the rejected answer from the gold answer and a sampled segment.

    ``rejected = gold[:cut] + segment + gold[cut + window:]`` with
    ``window = min(segment_length, len(gold))``. If the segment contains an end-of-sequence token
    (``eos_token_id`` may be one id or several), the answer ends there: the segment is kept up to
    and including its first EOS and the gold tail is dropped, because text after an EOS would
    never be generated.
    """
    window = segment_window(len(gold_ids), segment_length)
    if not 0 <= cut <= len(gold_ids) - window:
        raise ValueError(
            f"cut {cut} out of range [0, {len(gold_ids) - window}] for gold of length {len(gold_ids)}"
        )
    segment = list(segment_ids)
    eos_ids = _as_set(eos_token_id)
    for position, token in enumerate(segment):
        if token in eos_ids:
            return list(gold_ids[:cut]) + segment[: position + 1]
    return list(gold_ids[:cut]) + segment + list(gold_ids[cut + window :])
