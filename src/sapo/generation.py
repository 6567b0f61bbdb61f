"""SAPO's negatives: the sampling model rewrites a span of each gold answer, in one batched call.

For every ``(prompt_ids, gold_ids)`` row a cut is placed (:mod:`sapo.segments`: uniformly, the
paper's rule, or where the sampling model is least sure of the gold answer), the model samples
up to ``span`` tokens after ``prompt + gold[:cut]`` (:class:`sapo.sampling.Sampler`, every row
at once), and the rejected answer is spliced. ``"uncertain"`` placement first runs the model
teacher-forced over ``prompt + gold`` to read the probability of every gold token; the LM head
runs on the gold positions only, in chunks (:func:`sapo.logprobs.position_logps`), so the pass
never holds a batch's full logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from trl.trainer.utils import pad

from sapo.logprobs import position_logps
from sapo.pairs import Pair
from sapo.sampling import Sampler
from sapo.segments import cut_covering, last_cut, replaced_span, sample_cut, splice, uncertain_position

Row = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, gold_ids)


@dataclass
class Negatives:
    """What one generation call made, and what tells whether its negatives carry signal.

    Attributes:
        pairs: one pair per row, in row order.
        segment_tokens: tokens sampled in all.
        cut_positions: each cut over its gold answer's length (0: the start).
        placed_probabilities: ``"uncertain"`` placement only: the probability the sampling model
            gave the gold token each span was placed on.
    """

    pairs: list[Pair]
    segment_tokens: int
    cut_positions: list[float]
    placed_probabilities: list[float] | None = None

    def metrics(self) -> dict[str, float]:
        """``sapo/segment_tokens``, ``sapo/tied_fraction``, ``sapo/cut_position`` and (placed
        cuts) ``sapo/placed_token_probability`` of this call."""
        count = max(1, len(self.pairs))
        metrics = {
            "sapo/segment_tokens": float(self.segment_tokens),
            "sapo/tied_fraction": sum(pair.tied for pair in self.pairs) / count,
            "sapo/cut_position": sum(self.cut_positions) / count,
        }
        if self.placed_probabilities:
            metrics["sapo/placed_token_probability"] = sum(self.placed_probabilities) / count
        return metrics


@torch.inference_mode()
def gold_token_probabilities(
    model: torch.nn.Module, rows: Sequence[Row], pad_token_id: int, chunk_size: int | None = 256
) -> list[list[float]]:
    """``p(gold[t] | prompt + gold[:t])`` under ``model`` for every gold token of every row, from
    one teacher-forced pass over the right-padded rows."""
    sequences = [torch.tensor([*prompt, *gold], dtype=torch.long) for prompt, gold in rows]
    device = next(model.parameters()).device
    input_ids = pad(sequences, padding_value=pad_token_id).to(device)
    attention_mask = pad([torch.ones_like(s) for s in sequences], padding_value=0).to(device)
    # position t predicts token t + 1: a row's gold tokens are predicted from len(prompt) - 1 on,
    # so the positions before the shortest prompt's end predict none and get no logits
    first = max(0, min(len(prompt) for prompt, _ in rows) - 1)
    kept = input_ids.shape[1] - first
    positions = [
        row * kept + token - first
        for row, (prompt, gold) in enumerate(rows)
        for token in range(len(prompt) - 1, len(prompt) + len(gold) - 1)
    ]
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    targets = input_ids.roll(-1, dims=1)[:, first:, None]
    index = torch.tensor(positions, dtype=torch.long, device=device)
    probabilities = position_logps(model, inputs, targets, index, chunk_size)[:, 0].exp().tolist()
    lengths = [len(gold) for _, gold in rows]
    starts = [sum(lengths[:row]) for row in range(len(rows))]
    return [probabilities[start : start + length] for start, length in zip(starts, lengths)]


def self_augmented_pairs(
    model: torch.nn.Module,
    rows: Sequence[Row],
    sampler: Sampler,
    cut_generator: torch.Generator,
    segment_length: int,
    max_length: int | None,
    placement: str = "uniform",
    step: int = 0,
    version: int | None = None,
    chunk_size: int | None = 256,
) -> Negatives:
    """SAPO's negatives for ``rows``: place a cut per row, let ``model`` rewrite one span of each
    gold answer in one batched call, splice the rejected answers (pairs stamped with ``step``).

    ``placement``: ``"uniform"`` draws each cut from ``cut_generator``; ``"uncertain"`` places it
    from the model's own gold-token probabilities (it draws nothing). ``version`` names the
    weights ``model`` holds, for a sampling engine that keeps its own copy of them.
    """
    if not rows:
        return Negatives([], 0, [])
    placed = None
    if placement == "uniform":
        cuts = [sample_cut(len(p), len(g), segment_length, max_length, cut_generator)[0] for p, g in rows]
    elif placement == "uncertain":
        with sampler.threads_for(model):
            probabilities = gold_token_probabilities(model, rows, sampler.pad_token_id, chunk_size)
        cuts, placed = [], []
        for (prompt, gold), probs in zip(rows, probabilities):
            highest = last_cut(len(prompt), len(gold), segment_length, max_length)
            position = uncertain_position(probs[: highest + replaced_span(len(gold), segment_length)])
            cuts.append(cut_covering(position, highest))
            placed.append(probs[position])
    else:
        raise ValueError(f"placement={placement!r}: must be 'uniform' or 'uncertain'")
    prefixes = [[*prompt, *gold[:cut]] for (prompt, gold), cut in zip(rows, cuts)]
    spans = [replaced_span(len(gold), segment_length) for _, gold in rows]
    segments = sampler.generate(model, prefixes, spans, version=version)
    pairs = [
        Pair(list(p), list(g), splice(g, cut, segment, segment_length, sampler.eos_token_ids), step)
        for (p, g), cut, segment in zip(rows, cuts, segments)
    ]
    return Negatives(
        pairs,
        sum(len(segment) for segment in segments),
        [cut / len(gold) for (_, gold), cut in zip(rows, cuts)],
        placed,
    )
