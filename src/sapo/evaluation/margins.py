"""How strongly a model prefers the gold answer over its own segment-spliced rewrite of it, and
how often its greedy answer is the gold one.

For every held-out row the model itself samples a segment (the same rule as training), the
rejected answer is spliced, and both answers are scored by the model:

- ``gold_logp``: mean summed log-prob of the gold answer;
- ``margin``: mean of ``log p(gold) - log p(rejected)``;
- ``win_rate``: fraction of rows where ``log p(gold) > log p(rejected)``.

This is the quantity SAPO trains; it rises when training works. :func:`held_out_scores` is the
entry point (:func:`margin_batches` yields the same work batch by batch, for callers that gather
it across processes). For tasks with one right answer, :func:`greedy_answers` is the one loop of
greedy answers that exact match (:func:`greedy_accuracy`, :func:`sapo.builtin.tasks.task_scores`)
is computed from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from sapo.generation import self_augmented_pairs
from sapo.sampling import Sampler, evaluating
from sapo.scoring import collate_pairs, completion_logps

Row = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, gold_ids)


def margin_batches(
    model: torch.nn.Module,
    rows: Sequence[Row],
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    segment_length: int,
    seed: int = 0,
    batch_size: int = 32,
    temperature: float = 0.7,
    top_p: float = 0.95,
    top_k: int = 50,
    backend="auto",
    version: int | None = None,
    chunk_size: int | None = 256,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch of rows, the gold answers' summed log-probs and the margins
    ``log p(gold) - log p(rejected)``. Cuts and sampling are seeded by ``seed``, so two models
    evaluated with the same seed see the same cut points. ``backend`` samples the segments (a
    name or a :class:`~sapo.sampling.SamplingBackend`); ``version`` names ``model``'s weights
    (``None``: unknown, an engine that copies them refreshes its copy at every batch).
    ``chunk_size``: positions per chunk of the LM head (``logprob_chunk_size``): a batch of 32 pairs
    of 512 tokens would otherwise hold 20 GB of logits at a 151,936-token vocabulary."""
    if not rows:
        raise ValueError("no rows to evaluate")
    cut_generator = torch.Generator().manual_seed(seed)
    sampler = Sampler(pad_token_id, eos_token_ids, temperature, top_p, top_k, seed=seed, backend=backend)
    device = next(model.parameters()).device
    with evaluating(model):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            with torch.no_grad():
                pairs = self_augmented_pairs(
                    model, chunk, sampler, cut_generator, segment_length, None, version=version
                ).pairs
                batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad_token_id).items()}
                logps, _ = completion_logps(model, batch, chunk_size)
            chosen, rejected = logps.chunk(2)
            yield chosen.cpu(), (chosen - rejected).cpu()


def summarize_margins(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """``gold_logp``, ``margin`` and ``win_rate`` from the batches of :func:`margin_batches`."""
    gold = torch.cat([gold for gold, _ in batches])
    margin = torch.cat([margin for _, margin in batches])
    return {
        "gold_logp": gold.mean().item(),
        "margin": margin.mean().item(),
        "win_rate": (margin > 0).float().mean().item(),
    }


def greedy_answers(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    limits: Sequence[int],
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    batch_size: int = 256,
    progress: bool = False,
    backend="auto",
    version: int | None = None,
) -> Iterator[list[int]]:
    """The greedy answer to every prompt (at most ``limits[i]`` tokens, ending at its first
    end-of-answer id), in order, ``batch_size`` prompts per batched call (``backend``,
    ``version``: as for :func:`margin_batches`)."""
    greedy = Sampler.greedy(pad_token_id, eos_token_ids, backend=backend)
    starts = range(0, len(prompts), batch_size)
    with evaluating(model):
        for start in tqdm(starts, desc="Greedy answers", disable=not progress, leave=False):
            stop = start + batch_size
            yield from greedy.generate(model, prompts[start:stop], limits[start:stop], version=version)


def greedy_accuracy(
    model: torch.nn.Module,
    rows: Sequence[Row],
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    batch_size: int = 256,
    progress: bool = False,
    backend="auto",
    version: int | None = None,
) -> float:
    """Exact-match accuracy: the fraction of rows whose greedy answer is the gold answer.

    The gold ids end in EOS, so an answer counts only if it stops exactly where the gold does.
    """
    if not rows:
        raise ValueError("no rows to evaluate")
    prompts, golds = [prompt for prompt, _ in rows], [list(gold) for _, gold in rows]
    answers = greedy_answers(
        model, prompts, [len(gold) for gold in golds], pad_token_id, eos_token_ids, batch_size, progress,
        backend=backend, version=version,
    )  # fmt: skip
    return sum(answer == gold for answer, gold in zip(answers, golds)) / len(rows)


def held_out_scores(
    model: torch.nn.Module,
    rows: Sequence[Row],
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    segment_length: int,
    with_accuracy: bool,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    backend="auto",
    version: int | None = None,
    **sampling: float,
) -> dict[str, float]:
    """``gold_logp``, ``margin`` and ``win_rate`` of ``model`` on ``rows`` (plus exact-match
    ``accuracy`` when asked), with a progress bar.

    ``sampling`` takes ``temperature``, ``top_p`` and ``top_k`` for the model's own segments;
    ``backend`` and ``version``: as for :func:`margin_batches`.
    """
    engine = {"backend": backend, "version": version}
    batches = margin_batches(
        model, rows, pad_token_id, eos_token_ids, segment_length, seed=seed, batch_size=batch_size,
        **engine, **sampling,
    )  # fmt: skip
    total = -(-len(rows) // batch_size)
    results = summarize_margins(
        list(tqdm(batches, total=total, desc="Margin", disable=not progress, leave=False))
    )
    if with_accuracy:
        results["accuracy"] = greedy_accuracy(
            model, rows, pad_token_id, eos_token_ids, batch_size=batch_size, progress=progress, **engine
        )
    return results
