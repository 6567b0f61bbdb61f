"""Where a segment is cut from the gold response, and how the rejected answer is spliced.

SAPO builds a rejected answer by letting the EMA model rewrite a span of the gold answer:
``rejected = gold[:cut] + segment + gold[cut + span:]`` with ``span = min(segment_length,
len(gold))``. Two rules place the cut (``SAPOConfig.segment_placement``):

- ``"uniform"`` (the paper's): ``cut`` uniform over every position that leaves room for the span;
- ``"uncertain"`` (sapo's): the span starts at the first gold token the sampling model is more
  likely to miss than to produce (probability below one half), else at its least likely gold
  token. A model right on most of an answer is rewritten where it errs, instead of where a
  uniform draw falls: the rewrite differs from the gold answer far more often.

These functions are pure (ids and probabilities in, positions and ids out) so the rules can be
tested on their own; :mod:`sapo.generation` composes them with the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

# "uncertain" placement: a gold token the sampling model gives less than this probability is one
# it more likely misses than produces (then its greedy choice may be another token as well)
UNSURE_BELOW = 0.5


def replaced_span(gold_length: int, segment_length: int) -> int:
    """Number of gold tokens the segment replaces: ``min(segment_length, gold_length)``."""
    if segment_length <= 0:
        raise ValueError(f"segment_length must be positive, got {segment_length}")
    return min(segment_length, gold_length)


def last_cut(prompt_length: int, gold_length: int, segment_length: int, max_length: int | None) -> int:
    """The latest cut that leaves room for the span within the gold answer and, when given,
    within ``max_length`` (``prompt_length + cut + span <= max_length``); never below 0."""
    span = replaced_span(gold_length, segment_length)
    highest = gold_length - span
    if max_length is not None:
        highest = min(highest, max_length - prompt_length - span)
    return max(highest, 0)


def sample_cut(
    prompt_length: int,
    gold_length: int,
    segment_length: int,
    max_length: int | None,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Draw the paper's cut for one row: ``(cut, span)`` with ``cut`` uniform over
    ``[0, last_cut(...)]``. A gold answer no longer than ``segment_length`` is regenerated whole
    (``cut = 0``)."""
    highest = last_cut(prompt_length, gold_length, segment_length, max_length)
    cut = int(torch.randint(0, highest + 1, (1,), generator=generator).item())
    return cut, replaced_span(gold_length, segment_length)


def uncertain_position(gold_token_probs: Sequence[float]) -> int:
    """The gold position the sampling model is least sure of: the first whose probability is
    below :data:`UNSURE_BELOW`, else the least likely one (the first of equals)."""
    if not gold_token_probs:
        raise ValueError("an answer of no tokens has no position to place a segment on")
    for position, probability in enumerate(gold_token_probs):
        if probability < UNSURE_BELOW:
            return position
    return min(range(len(gold_token_probs)), key=gold_token_probs.__getitem__)


def cut_covering(position: int, highest: int) -> int:
    """The cut whose span starts at ``position``, moved back to ``highest`` when the span would
    run past the end; the span (of length ``gold_length - highest`` at the end) still covers it."""
    return min(position, highest)


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

    ``rejected = gold[:cut] + segment + gold[cut + span:]`` with
    ``span = min(segment_length, len(gold))``. If the segment contains an end-of-sequence token
    (``eos_token_id`` may be one id or several), the answer ends there: the segment is kept up to
    and including its first EOS and the gold tail is dropped, because text after an EOS would
    never be generated.
    """
    span = replaced_span(len(gold_ids), segment_length)
    if not 0 <= cut <= len(gold_ids) - span:
        raise ValueError(
            f"cut {cut} out of range [0, {len(gold_ids) - span}] for gold of length {len(gold_ids)}"
        )
    segment = list(segment_ids)
    eos_ids = _as_set(eos_token_id)
    for position, token in enumerate(segment):
        if token in eos_ids:
            return list(gold_ids[:cut]) + segment[: position + 1]
    return list(gold_ids[:cut]) + segment + list(gold_ids[cut + span :])
