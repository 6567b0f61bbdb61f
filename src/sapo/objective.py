"""The preference objective on one collated batch, with the metrics TRL logs for it.

Shared by every trainer that learns from (prompt, chosen, rejected) pairs: the policy's
log-probs come from ``score(model, batch)``; DPO reads the reference log-probs from the batch
(``ref_chosen_logps``/``ref_rejected_logps``, computed outside the gradient).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .losses import dpo_loss, orpo_loss


def preference_objective(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    loss_type: str,
    beta: float,
    score: Callable,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the batch and per-example metrics named as TRL names them.

    Rows ``[:B]`` of the batch are chosen answers, rows ``[B:]`` rejected ones.
    """
    logps, lengths = score(model, batch)
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
