"""The preference objective on one collated batch, with the metrics TRL logs for it.

Shared by every trainer that learns from (prompt, chosen, rejected) pairs: the policy's
log-probs come from ``score(model, batch)``; DPO reads the reference log-probs from the batch
(``ref_chosen_logps``/``ref_rejected_logps``, computed outside the gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from sapo.losses import dpo_loss, orpo_loss

if TYPE_CHECKING:
    from sapo.pairs import Pair
    from sapo.scoring import PairScorer


def drawn_batch(
    drawn: Sequence[Pair], positions: Sequence[int], scorer: PairScorer
) -> tuple[list[Pair], dict[str, torch.Tensor]]:
    """The distinct pairs of a batch drawn with replacement and their collated batch.

    ``positions`` name the drawn pairs in the buffer (a pair drawn twice has one position). The
    batch holds each distinct pair once, first draw first, and ``drawn_index``: for each draw, the
    index of its pair among them. Scoring the distinct pairs and repeating their log-probs by that
    index (:func:`as_drawn`) gives the loss and the gradients of scoring every draw, with one
    forward row per pair.
    """
    index: dict[int, int] = {}
    distinct = []
    for position, pair in zip(positions, drawn):
        if position not in index:
            index[position] = len(distinct)
            distinct.append(pair)
    batch = scorer.collate(distinct)
    batch["drawn_index"] = torch.tensor([index[position] for position in positions], dtype=torch.long)
    return distinct, batch


def as_drawn(score: Callable, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """``score(model, batch)`` on a batch of distinct pairs, its rows repeated in draw order.

    ``batch["drawn_index"]`` (from :func:`drawn_batch`) maps each of the ``K`` draws to one of
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
    rpo_alpha: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the batch and per-example metrics named as TRL names them.

    Rows ``[:B]`` of the batch are chosen answers, rows ``[B:]`` rejected ones. A batch of distinct
    pairs with a ``drawn_index`` is scored once and counted per draw (:func:`as_drawn`).
    ``rpo_alpha`` (DPO): add ``rpo_alpha`` times the token-averaged NLL of the scored chosen
    tokens (logged as ``nll_loss``); with DPO's scoring those are the chosen tokens past the
    part a pair's answers share at their start.
    """
    logps, lengths = as_drawn(score, model, batch)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    # token-level NLL over all scored chosen tokens of the batch (padding and prompts excluded)
    nll = -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)
    metrics: dict[str, torch.Tensor] = {}
    if loss_type == "dpo":
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen_logps, rejected_logps, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta
        )
        metrics["logps/chosen"], metrics["logps/rejected"] = chosen_logps, rejected_logps
        if rpo_alpha:
            losses = losses + rpo_alpha * nll
            metrics["nll_loss"] = nll
    elif loss_type == "orpo":
        chosen_avg = chosen_logps / chosen_lengths.clamp(min=1)
        rejected_avg = rejected_logps / rejected_lengths.clamp(min=1)
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
