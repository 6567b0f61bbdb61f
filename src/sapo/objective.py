"""The preference objective on one collated batch, with the metrics TRL logs for it.

Shared by every trainer that learns from (prompt, chosen, rejected) pairs: the policy's
log-probs come from ``score(model, batch)``; DPO reads the reference log-probs from the batch
(``ref_chosen_logps``/``ref_rejected_logps``, computed outside the gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from sapo.losses import dpo_loss, orpo_loss


def distinct_pairs(pairs: Sequence[Any]) -> tuple[list[Any], torch.Tensor]:
    """The distinct pairs of a batch drawn with replacement (by identity, first draw first) and,
    for each draw, the index of its pair among them.

    Scoring the distinct pairs and repeating their log-probs by that index (:func:`as_drawn`)
    gives the loss and the gradients of scoring every draw, with one forward row per pair.
    """
    position: dict[int, int] = {}
    distinct = []
    for pair in pairs:
        if id(pair) not in position:
            position[id(pair)] = len(distinct)
            distinct.append(pair)
    return distinct, torch.tensor([position[id(pair)] for pair in pairs], dtype=torch.long)


def as_drawn(score: Callable, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """``score(model, batch)`` on a batch of distinct pairs, its rows repeated in draw order.

    ``batch["drawn_index"]`` (from :func:`distinct_pairs`) maps each of the ``K`` draws to one of
    the ``D`` scored pairs; rows come as ``[:D]`` chosen, ``[D:]`` rejected and leave as ``[:K]``
    chosen, ``[K:]`` rejected. Without ``drawn_index`` the rows are returned as scored.
    """
    logps, lengths = score(model, batch)
    index = batch.get("drawn_index")
    if index is None:
        return logps, lengths
    rows = torch.cat([index, index + logps.shape[0] // 2]).to(logps.device)
    return logps[rows], lengths[rows]


def preference_objective(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    loss_type: str,
    beta: float,
    score: Callable,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the batch and per-example metrics named as TRL names them.

    Rows ``[:B]`` of the batch are chosen answers, rows ``[B:]`` rejected ones. A batch of distinct
    pairs with a ``drawn_index`` is scored once and counted per draw (:func:`as_drawn`).
    """
    logps, lengths = as_drawn(score, model, batch)
    chosen_logps, rejected_logps = logps.chunk(2)
    metrics: dict[str, torch.Tensor] = {}
    if loss_type == "dpo":
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps, rejected_logps, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta
        )
        metrics["logps/chosen"], metrics["logps/rejected"] = chosen_logps, rejected_logps
    elif loss_type == "orpo":
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        chosen_avg = chosen_logps / chosen_lengths.clamp(min=1)
        rejected_avg = rejected_logps / rejected_lengths.clamp(min=1)
        # token-level NLL over all chosen answers of the batch (padding and prompts excluded)
        nll = -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)
        losses, log_odds_ratio, log_odds_chosen = orpo_loss(nll, chosen_avg, rejected_avg, beta)
        chosen_rewards, rejected_rewards = beta * chosen_avg.detach(), beta * rejected_avg.detach()
        metrics.update(
            {
                "nll_loss": nll,
                "log_odds_ratio": log_odds_ratio,
                "log_odds_chosen": log_odds_chosen,
                "logps/chosen": chosen_avg,
                "logps/rejected": rejected_avg,
            }
        )
    else:
        raise ValueError(f"loss_type={loss_type!r}: must be 'dpo' or 'orpo'")
    metrics["rewards/chosen"] = chosen_rewards
    metrics["rewards/rejected"] = rejected_rewards
    metrics["rewards/margins"] = chosen_rewards - rejected_rewards
    metrics["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float()
    return losses.mean(), {name: value.detach() for name, value in metrics.items()}
