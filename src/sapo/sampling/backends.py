"""The backends behind :class:`sapo.sampling.Sampler`: one small interface, one class per engine.

A backend turns prefixes into new tokens; the sampler around it owns what every backend shares
(the seed of each call, CPU threads, trimming at the first end-of-answer id, the error a diverged
model raises). Two backends run on the model as a ``torch.nn.Module``:

- :class:`OwnLoop`: SAPO's cached sampling loop (:mod:`sapo.sampling.own_loop`) where the model
  allows it, transformers' ``generate`` elsewhere (``generation_backend="auto"``): ``generate``'s
  distribution, drawn among the top-k candidates, so other tokens for the same seed;
- :class:`Generate`: always transformers' ``generate`` (``generation_backend="transformers"``):
  its exact tokens for a seed, and the model's own ``generation_config`` (a repetition penalty, say).

A third engine (vLLM) implements the same :class:`SamplingBackend` protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from sapo.sampling.own_loop import sample_tokens, supports_cached_loop


@dataclass(frozen=True)
class SamplingSettings:
    """What every backend samples with: padding, the ids that end an answer, and the knobs."""

    pad_token_id: int
    eos_token_ids: tuple[int, ...]
    temperature: float
    top_p: float
    top_k: int


@runtime_checkable
class SamplingBackend(Protocol):
    """How new tokens are drawn after a batch of prefixes."""

    def sample(
        self,
        model: torch.nn.Module,
        prefixes: Sequence[Sequence[int]],
        limits: Sequence[int],
        settings: SamplingSettings,
        version: int | None,
    ) -> list[list[int]]:
        """Up to ``limits[i]`` new tokens after ``prefixes[i]`` for every row, in one batched call.

        A row may run past its first end-of-answer id (the sampler trims it). Randomness comes
        from torch's global generator, which the sampler has seeded for this call. ``version``
        names the weights ``model`` holds (the EMA's update count; ``None``: unknown), so an
        engine that keeps its own copy of the weights knows when to refresh it.
        """
        ...


def left_padded(
    prefixes: Sequence[Sequence[int]], pad_token_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of the prefixes, left-padded to the longest."""
    width = max(len(prefix) for prefix in prefixes)
    input_ids = torch.full((len(prefixes), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for row, prefix in enumerate(prefixes):
        if prefix:
            input_ids[row, width - len(prefix) :] = torch.tensor(list(prefix), dtype=torch.long)
            attention_mask[row, width - len(prefix) :] = 1
    return input_ids.to(device), attention_mask.to(device)


class _PerRowLimit(StoppingCriteria):
    """Marks row ``i`` done once it has ``limits[i]`` new tokens."""

    def __init__(self, prefix_width: int, limits: torch.Tensor):
        self.prefix_width = prefix_width
        self.limits = limits

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.prefix_width) >= self.limits


def generation_config(settings: SamplingSettings, max_new_tokens: int) -> GenerationConfig:
    """The `GenerationConfig` of a call through transformers' ``generate``."""
    return GenerationConfig(
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        max_new_tokens=max_new_tokens,
        pad_token_id=settings.pad_token_id,
        eos_token_id=list(settings.eos_token_ids),
        use_cache=True,
    )


class Generate:
    """transformers' ``generate``, with a per-row limit."""

    name = "transformers"

    def sample(self, model, prefixes, limits, settings, version=None):
        device = next(model.parameters()).device
        input_ids, attention_mask = left_padded(prefixes, settings.pad_token_id, device)
        width = input_ids.shape[1]
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=generation_config(settings, int(max(limits))),
            stopping_criteria=StoppingCriteriaList(
                [_PerRowLimit(width, torch.tensor(list(limits), dtype=torch.long, device=device))]
            ),
        )
        return output[:, width:].tolist()


class OwnLoop:
    """SAPO's cached loop where it gives ``generate``'s distribution (see
    :func:`~sapo.sampling.own_loop.supports_cached_loop`), else ``generate``."""

    name = "auto"

    def sample(self, model, prefixes, limits, settings, version=None):
        most = int(max(limits))
        if not supports_cached_loop(model, max(len(prefix) for prefix in prefixes) + most):
            return Generate().sample(model, prefixes, limits, settings, version)
        device = next(model.parameters()).device
        input_ids, attention_mask = left_padded(prefixes, settings.pad_token_id, device)
        tokens = sample_tokens(
            model,
            input_ids,
            attention_mask,
            torch.tensor(list(limits), dtype=torch.long, device=device),
            settings.eos_token_ids,
            settings.pad_token_id,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
        )
        return tokens.tolist()


TORCH_BACKENDS = {backend.name: backend for backend in (OwnLoop, Generate)}
