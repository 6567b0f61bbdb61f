"""How strongly a model prefers the gold answer over its own segment-spliced rewrite of it.

For every held-out row the model itself samples a segment (the same rule as training), the
rejected answer is spliced, and both answers are scored by the model:

- ``gold_logp``: mean summed log-prob of the gold answer;
- ``margin``: mean of ``log p(gold) - log p(rejected)``;
- ``win_rate``: fraction of rows where ``log p(gold) > log p(rejected)``.

This is the quantity SAPO trains; it rises when training works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .generation import SegmentGenerator
from .logprobs import collate_pairs, completion_logps
from .segments import sample_cut, splice


@torch.no_grad()
def preference_margin(
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
) -> dict[str, float]:
    """Score ``rows`` (``(prompt_ids, gold_ids)`` pairs) against the model's own segments.

    Cuts and sampling are seeded by ``seed``, so two models evaluated with the same seed see the
    same cut points.
    """
    if not rows:
        raise ValueError("no rows to evaluate")
    was_training = model.training
    model.eval()
    cut_generator = torch.Generator().manual_seed(seed)
    sampler = SegmentGenerator(pad_token_id, eos_token_ids, temperature, top_p, top_k, seed=seed)
    device = next(model.parameters()).device
    gold_logps, margins = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        cuts = [sample_cut(len(p), len(g), segment_length, None, cut_generator) for p, g in chunk]
        prefixes = [list(p) + list(g[:cut]) for (p, g), (cut, _) in zip(chunk, cuts)]
        segments = sampler.generate(model, prefixes, [window for _, window in cuts])
        pairs = [
            {
                "prompt_ids": p,
                "chosen_ids": g,
                "rejected_ids": splice(g, cut, s, segment_length, eos_token_ids),
            }
            for (p, g), (cut, _), s in zip(chunk, cuts, segments)
        ]
        batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad_token_id).items()}
        logps, _ = completion_logps(model, batch)
        chosen, rejected = logps.chunk(2)
        gold_logps.append(chosen.cpu())
        margins.append((chosen - rejected).cpu())
    model.train(was_training)
    gold = torch.cat(gold_logps)
    margin = torch.cat(margins)
    return {
        "gold_logp": gold.mean().item(),
        "margin": margin.mean().item(),
        "win_rate": (margin > 0).float().mean().item(),
    }
