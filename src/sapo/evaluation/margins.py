"""How strongly a model prefers the gold answer over its own segment-spliced rewrite of it.

For every held-out row the model itself samples a segment (the same rule as training), the
rejected answer is spliced, and both answers are scored by the model:

- ``gold_logp``: mean summed log-prob of the gold answer;
- ``margin``: mean of ``log p(gold) - log p(rejected)``;
- ``win_rate``: fraction of rows where ``log p(gold) > log p(rejected)``.

This is the quantity SAPO trains; it rises when training works. For tasks with one right answer,
:func:`greedy_accuracy` adds the exact-match accuracy of greedy decoding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from sapo.generation import SegmentGenerator, self_augmented_pairs
from sapo.scoring import collate_pairs, completion_logps


def preference_margin(
    model: torch.nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    segment_length: int,
    **options,
) -> dict[str, float]:
    """Score ``rows`` (``(prompt_ids, gold_ids)`` pairs) against the model's own segments.

    ``options`` are :func:`margin_batches`'s (``seed``, ``batch_size``, ``temperature``, ``top_p``,
    ``top_k``). Cuts and sampling are seeded by ``seed``, so two models evaluated with the same
    seed see the same cut points.
    """
    batches = margin_batches(model, rows, pad_token_id, eos_token_ids, segment_length, **options)
    return summarize_margins(list(batches))


def margin_batches(
    model: torch.nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    segment_length: int,
    seed: int = 0,
    batch_size: int = 32,
    temperature: float = 0.7,
    top_p: float = 0.95,
    top_k: int = 50,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The work of :func:`preference_margin` one batch at a time, so callers can show progress.

    Yields, per batch of rows, the gold answers' summed log-probs and the margins
    ``log p(gold) - log p(rejected)``.
    """
    if not rows:
        raise ValueError("no rows to evaluate")
    was_training = model.training
    model.eval()
    cut_generator = torch.Generator().manual_seed(seed)
    sampler = SegmentGenerator(pad_token_id, eos_token_ids, temperature, top_p, top_k, seed=seed)
    device = next(model.parameters()).device
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            with torch.no_grad():
                pairs, _ = self_augmented_pairs(model, chunk, sampler, cut_generator, segment_length, None)
                batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad_token_id).items()}
                logps, _ = completion_logps(model, batch)
            chosen, rejected = logps.chunk(2)
            yield chosen.cpu(), (chosen - rejected).cpu()
    finally:
        model.train(was_training)


def summarize_margins(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """``gold_logp``, ``margin`` and ``win_rate`` from the batches of :func:`margin_batches`."""
    gold = torch.cat([gold for gold, _ in batches])
    margin = torch.cat([margin for _, margin in batches])
    return {
        "gold_logp": gold.mean().item(),
        "margin": margin.mean().item(),
        "win_rate": (margin > 0).float().mean().item(),
    }


def greedy_accuracy(
    model: torch.nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    batch_size: int = 256,
    progress: bool = False,
) -> float:
    """Exact-match accuracy: the fraction of rows whose greedy answer is the gold answer.

    The gold ids end in EOS, so an answer counts only if it stops exactly where the gold does.
    Greedy decoding is sampling from the top-1 token (``top_k=1``), which reuses the batched,
    left-padded generation of :class:`~sapo.generation.SegmentGenerator`.
    """
    if not rows:
        raise ValueError("no rows to evaluate")
    greedy = SegmentGenerator(pad_token_id, eos_token_ids, temperature=1.0, top_p=1.0, top_k=1)
    was_training = model.training
    model.eval()
    correct = 0
    starts = range(0, len(rows), batch_size)
    try:
        for start in tqdm(starts, desc="Exact match", disable=not progress, leave=False):
            chunk = rows[start : start + batch_size]
            answers = greedy.generate(
                model, [prompt for prompt, _ in chunk], [len(gold) for _, gold in chunk]
            )
            correct += sum(answer == list(gold) for answer, (_, gold) in zip(answers, chunk))
    finally:
        model.train(was_training)
    return correct / len(rows)


def evaluate(
    model: torch.nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    segment_length: int,
    with_accuracy: bool,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    **sampling: float,
) -> dict[str, float]:
    """:func:`preference_margin` (plus exact-match ``accuracy`` when asked) with a progress bar.

    ``sampling`` takes ``temperature``, ``top_p`` and ``top_k`` for the model's own segments.
    """
    batches = margin_batches(
        model, rows, pad_token_id, eos_token_ids, segment_length, seed=seed, batch_size=batch_size, **sampling
    )
    total = -(-len(rows) // batch_size)
    results = summarize_margins(
        list(tqdm(batches, total=total, desc="Margin", disable=not progress, leave=False))
    )
    if with_accuracy:
        results["accuracy"] = greedy_accuracy(
            model, rows, pad_token_id, eos_token_ids, batch_size=batch_size, progress=progress
        )
    return results
