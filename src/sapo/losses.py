"""Preference losses on sequence log-probabilities: DPO (with a reference) and ORPO (without).

Pure functions: log-probs in, per-example tensors out. Reduction and logging are the caller's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss on summed response log-probs.

    ``loss = -log σ(β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))])``

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each of shape ``(batch,)``; the rewards
    are ``β (log π - log π_ref)``, detached, as TRL logs them.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable both near 0 and for large negative ``x``."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_nll: torch.Tensor,
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO loss: ``NLL(c) - β log σ(log_odds(c) - log_odds(r))``.

    ``chosen_avg_logps``/``rejected_avg_logps`` are length-averaged response log-probs ``ℓ`` and
    ``log_odds(y) = ℓ - log(1 - exp(ℓ))``. ``chosen_nll`` is the chosen answers' negative
    log-likelihood (a scalar or one value per example; it broadcasts).

    Returns ``(losses, log_odds_ratio, log_odds_chosen)`` with ``log_odds_ratio = log σ(Δ)`` and
    ``log_odds_chosen = Δ`` per example, the quantities TRL logs under those names.
    """
    chosen = chosen_avg_logps.float()
    rejected = rejected_avg_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    log_odds_ratio = F.logsigmoid(log_odds)
    losses = chosen_nll - beta * log_odds_ratio
    return losses, log_odds_ratio.detach(), log_odds.detach()
