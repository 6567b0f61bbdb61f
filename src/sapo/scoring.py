"""Score preference pairs under a causal LM: summed response log-probs of chosen and rejected.

Two layouts of a batch of pairs give the same log-probs (:class:`PairScorer`):

- padded (here): chosen and rejected rows in one forward pass (chosen first, then rejected),
  right-padded; only response tokens count (prompt and padding are masked);
- packed (:mod:`sapo.packing`): one row per pair, the shared prefix once.

Either way the LM head runs on the scored positions only, in chunks of ``chunk_size`` positions
where the model allows it (:mod:`sapo.logprobs`), and for DPO (``score_shared_prefix=False``)
not on the response tokens the two sides share at their start: their log-probs cancel in the
DPO margin, so the sums leave them out on both sides.

:func:`reference_logps` scores pairs under the DPO reference; :func:`pairs_to_score` says which
pairs need it (the others carry log-probs of the same reference version).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from trl.trainer.utils import pad

from sapo.logprobs import position_logps
from sapo.packing import common_prefix_length, pack_pairs, packed_completion_logps, supports_packing

if TYPE_CHECKING:
    from sapo.copies.contract import Reference
    from sapo.pairs import Pair


def collate_pairs(
    pairs: Sequence[Pair], pad_token_id: int, score_shared_prefix: bool = True
) -> dict[str, torch.Tensor]:
    """Stack pairs into ``input_ids``/``attention_mask``/``completion_mask`` of shape ``(2B, T)``.

    Each pair (:class:`~sapo.pairs.Pair`) holds ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``. Rows
    ``[:B]`` are prompt + chosen, rows ``[B:]`` prompt + rejected. ``scored_positions`` lists the
    positions whose prediction is scored, as indices ``row * T + t`` (position ``t`` predicts
    token ``t + 1``): every response token but a sequence's first, and, without
    ``score_shared_prefix``, only those past the tokens the pair's two sequences share at their start.
    """
    # a pair's first scored token: past its prompt, and without score_shared_prefix past what its
    # two sequences share
    starts = [
        len(pair.prompt_ids)
        + (0 if score_shared_prefix else common_prefix_length(pair.chosen_ids, pair.rejected_ids))
        for pair in pairs
    ]
    sequences, completion_masks, scored = [], [], []
    for side in ("chosen_ids", "rejected_ids"):
        for pair, start in zip(pairs, starts):
            prompt, response = pair.prompt_ids, getattr(pair, side)
            sequences.append(torch.tensor(list(prompt) + list(response), dtype=torch.long))
            completion_masks.append(torch.tensor([0] * len(prompt) + [1] * len(response), dtype=torch.long))
            scored.append(range(max(1, start), len(prompt) + len(response)))
    width = max(len(sequence) for sequence in sequences)
    positions = [row * width + token - 1 for row, tokens in enumerate(scored) for token in tokens]
    return {
        "input_ids": pad(sequences, padding_value=pad_token_id),
        "attention_mask": pad([torch.ones_like(s) for s in sequences], padding_value=0),
        "completion_mask": pad(completion_masks, padding_value=0),
        "scored_positions": torch.tensor(positions, dtype=torch.long),
    }


def completion_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and scored token counts, one value per row of ``collate_pairs``.

    Returns ``(logps, lengths)`` with ``logps[i] = Σ_t log p(x_t | x_<t)`` over row ``i``'s scored
    tokens (``batch["scored_positions"]``). Where the model allows it, the LM head runs on those
    positions only, ``chunk_size`` at a time (:func:`sapo.logprobs.position_logps`); otherwise the
    model computes the logits of every position.
    """
    input_ids, positions = batch["input_ids"], batch["scored_positions"]
    rows, width = input_ids.shape
    inputs = {"input_ids": input_ids, "attention_mask": batch["attention_mask"]}
    targets = input_ids.roll(-1, dims=1)[..., None]  # the next token (the last position's is never scored)
    per_token = position_logps(model, inputs, targets, positions, chunk_size)[:, 0]
    # back onto the (2B, T) grid (each position once: deterministic, unlike a scattered sum)
    grid = per_token.new_zeros(rows * width).index_copy(0, positions, per_token)
    counts = per_token.new_zeros(rows * width).index_fill(0, positions, 1.0)
    return grid.view(rows, width).sum(dim=1), counts.view(rows, width).sum(dim=1)


@dataclass(frozen=True)
class PairScorer:
    """How a batch of pairs is laid out and scored: ``collate(pairs)`` builds the batch and
    ``score(model, batch)`` returns ``(logps, lengths)``, rows ``[:B]`` chosen, ``[B:]`` rejected."""

    collate: Callable[[Sequence[Pair]], dict[str, torch.Tensor]]
    score: Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
    packed: bool


def pair_scorer(
    layout: str,
    pad_token_id: int,
    models: Sequence[torch.nn.Module],
    max_length: int | None,
    chunk_size: int | None = None,
    score_shared_prefix: bool = True,
) -> PairScorer:
    """The scorer for ``layout`` (``"packed"``, ``"padded"`` or ``"auto"``: packed where every one
    of ``models`` takes the packed 4D mask exactly, see :func:`sapo.packing.supports_packing`).

    ``chunk_size``: positions per chunk of the LM head (``None`` or 0: the model's own logits).
    ``score_shared_prefix=False`` (DPO) leaves out the response tokens a pair's sides share at
    their start, whose log-probs cancel in the DPO margin: the sums then run over the rest.
    """
    packable = all(supports_packing(model, max_length) for model in models)
    if layout == "packed" and not packable:
        raise ValueError(
            "pair_scoring='packed': the model's attention cannot take the packed 4D mask exactly "
            "(it needs sdpa or eager attention and no window shorter than max_length); use 'auto' or 'padded'"
        )
    if layout not in ("auto", "packed", "padded"):
        raise ValueError(f"pair_scoring={layout!r}: must be one of auto, packed, padded")
    packed = layout != "padded" and packable
    collate = functools.partial(
        pack_pairs if packed else collate_pairs,
        pad_token_id=pad_token_id,
        score_shared_prefix=score_shared_prefix,
    )
    score = functools.partial(packed_completion_logps if packed else completion_logps, chunk_size=chunk_size)
    return PairScorer(collate, score, packed)


def pairs_to_score(reference: Reference, pairs: Sequence[Pair], version: int) -> list[Pair]:
    """The pairs whose reference log-probs must be computed now: those with none cached for
    ``version``, or every pair when the reference is sharded (its forward gathers weights from all
    ranks, so each rank scores every pair, every time, or a rank with nothing left to score would
    leave the others waiting)."""
    return [pair for pair in pairs if reference.sharded or not pair.reference_cached(version)]


def reference_logps(
    reference: Reference, pairs: Sequence[Pair], scorer: PairScorer, device, collated=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of each pair's chosen and rejected answers, ``(chosen, rejected)``, on
    the CPU in float32, from one batch laid out and scored by ``scorer``.

    ``collated``, when given, is ``scorer.collate(pairs)`` (the policy's batch, which the caller
    has already built). A whole reference scores under ``torch.inference_mode``; a sharded one
    under ``no_grad``, as its forward gathers weights in place.
    """
    batch = scorer.collate(pairs) if collated is None else collated
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    grad_off = torch.no_grad() if reference.sharded else torch.inference_mode()
    with grad_off, reference.scoring_model() as model:
        logps, _ = scorer.score(model, batch)
    chosen, rejected = logps.float().cpu().chunk(2)
    return chosen, rejected
