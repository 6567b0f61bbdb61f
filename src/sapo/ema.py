"""The exponential moving average (EMA) of the policy: its rule, shared by every home of the EMA.

Update rule, applied every ``ema_update_interval`` optimizer steps::

    ema = decay * ema + (1 - decay) * policy

``decay`` weights the OLD average (the paper uses 0.5). TRL's ``ref_model_mixup_alpha`` is the
other way round: there ``alpha`` weights the NEW policy. The average is kept in float32 even when
the policy trains in bfloat16: with a decay near 1 the per-step change ``(1 - decay) * delta`` is
smaller than bfloat16's resolution and a bf16 average would stop moving. Where the average lives
(a whole copy, LoRA adapters, FSDP2 shards, ZeRO-3 slices) is :mod:`sapo.copies`' concern.
"""

from __future__ import annotations

import torch


def check_decay(decay: float) -> None:
    """The one rule for a decay, shared by every EMA home and by ``SAPOConfig``."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")


@torch.no_grad()
def move_average(average: torch.Tensor, current: torch.Tensor, decay: float) -> None:
    """``average = decay * average + (1 - decay) * current``, in place, in ``average``'s float32
    (``current`` is cast and moved to it)."""
    average.lerp_(current.detach().to(device=average.device, dtype=torch.float32), 1.0 - decay)
