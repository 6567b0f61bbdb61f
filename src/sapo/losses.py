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


# ORPO's odds are infinite for an answer of probability 1 (average log-prob 0), which a converged
# model reaches in float32 on short answers; the average log-prob is capped just below 0 so the
# odds stay finite, and so do their gradients (a gold answer that certain has nothing to gain)
AVERAGE_LOGP_CEILING = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable both near 0 and for large negative ``x``.

    Both branches are computed on inputs where they are finite: ``torch.where`` passes the
    gradient of the unused branch too, and an infinite one would turn it into NaN.
    """
    near_zero = x > -0.6931471805599453
    small = torch.where(near_zero, x, torch.full_like(x, -1.0))
    large = torch.where(near_zero, torch.full_like(x, -1.0), x)
    return torch.where(near_zero, torch.log(-torch.expm1(small)), torch.log1p(-torch.exp(large)))


def orpo_loss(
    chosen_nll: torch.Tensor,
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO loss: ``NLL(c) - β log σ(log_odds(c) - log_odds(r))``.

    ``chosen_avg_logps``/``rejected_avg_logps`` are length-averaged response log-probs ``ℓ`` and
    ``log_odds(y) = ℓ - log(1 - exp(ℓ))``, with ``ℓ`` capped at ``AVERAGE_LOGP_CEILING`` so that a
    certain answer (``ℓ = 0``) has large, finite odds. ``chosen_nll`` is the chosen answers' negative
    log-likelihood (a scalar or one value per example; it broadcasts).

    Returns ``(losses, log_odds_ratio, log_odds_chosen)`` with ``log_odds_ratio = log σ(Δ)`` and
    ``log_odds_chosen = Δ`` per example, the quantities TRL logs under those names.
    """
    chosen = chosen_avg_logps.float().clamp(max=AVERAGE_LOGP_CEILING)
    rejected = rejected_avg_logps.float().clamp(max=AVERAGE_LOGP_CEILING)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    log_odds_ratio = F.logsigmoid(log_odds)
    losses = chosen_nll - beta * log_odds_ratio
    return losses, log_odds_ratio.detach(), log_odds.detach()
