"""Sample SAPO's segments: up to ``window`` new tokens after each ``prompt + gold[:cut]`` prefix.

All rows of a generation step go through one batched call (left padding, KV cache). A row stops
at its own window or at EOS; the call ends as soon as every row has stopped. Sampling draws from a
seed taken from the generator's own ``torch.Generator``, so a run is reproducible and the
generator's state can be checkpointed.

The loop is :func:`sapo.decoding.sample_tokens` where the model allows it (``backend="auto"``):
``generate``'s sampling with the attention masks prepared once per call and the same tokens for
the same seed. Elsewhere, or with ``backend="transformers"``, it is transformers' ``generate``.
On CPU, ``num_threads`` can cap torch's intra-op threads while sampling: a decode step is dozens
of small matrix products, and when other processes share the cores, each one split across
threads waits for whichever thread was descheduled. What each option costs and saves is measured
in docs/performance.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from sapo.config import GENERATION_BACKENDS
from sapo.decoding import sample_tokens, sampling_processors, supports_cached_loop
from sapo.segments import sample_cut, splice


class _PerRowLimit(StoppingCriteria):
    """Marks row ``i`` done once it has ``limits[i]`` new tokens."""

    def __init__(self, prefix_width: int, limits: torch.Tensor):
        self.prefix_width = prefix_width
        self.limits = limits

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.prefix_width) >= self.limits


@dataclass
class SegmentGenerator:
    """Batched, seeded segment sampling.

    Args:
        pad_token_id: id used for left padding.
        eos_token_ids: ids that end an answer.
        temperature, top_p, top_k: sampling knobs (see ``SAPOConfig``).
        seed: seed of the generator that draws one sampling seed per call.
        num_threads: torch intra-op threads while generating on CPU (``None``: leave torch's
            setting); restored afterwards. Has no effect on other devices.
        backend: ``"auto"``: SAPO's cached loop where the model allows it
            (:func:`sapo.decoding.supports_cached_loop`), else ``generate``; ``"transformers"``:
            always ``generate``.
    """

    pad_token_id: int
    eos_token_ids: Sequence[int]
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    seed: int = 0
    num_threads: int | None = None
    backend: str = "auto"

    def __post_init__(self):
        if self.backend not in GENERATION_BACKENDS:
            raise ValueError(f"backend={self.backend!r}: must be one of {', '.join(GENERATION_BACKENDS)}")
        self.eos_token_ids = list(self.eos_token_ids)
        self.generator = torch.Generator().manual_seed(self.seed)

    def generation_config(self, max_new_tokens: int) -> GenerationConfig:
        """The `GenerationConfig` of a call through transformers' ``generate``."""
        return GenerationConfig(
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
            use_cache=True,
        )

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, prefixes: Sequence[Sequence[int]], max_new_tokens: Sequence[int]
    ) -> list[list[int]]:
        """Sample up to ``max_new_tokens[i]`` tokens after ``prefixes[i]`` for every row at once.

        A returned segment ends at its first EOS (kept) or at its limit, whichever comes first.
        A model whose weights diverged raises ``FloatingPointError``.
        """
        if len(prefixes) != len(max_new_tokens):
            raise ValueError("prefixes and max_new_tokens differ in length")
        if not prefixes:
            return []
        device = next(model.parameters()).device
        width = max(len(prefix) for prefix in prefixes)
        input_ids = torch.full((len(prefixes), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prefixes), width), dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            if prefix:
                input_ids[row, width - len(prefix) :] = torch.tensor(list(prefix), dtype=torch.long)
                attention_mask[row, width - len(prefix) :] = 1
        limits = torch.tensor(list(max_new_tokens), dtype=torch.long, device=device)
        most = int(max(max_new_tokens))
        call_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())
        devices = [device] if device.type == "cuda" else []
        threads = self.num_threads if device.type == "cpu" else None
        cached_loop = self.backend == "auto" and supports_cached_loop(model, width + most)
        with torch.random.fork_rng(devices=devices), _intra_op_threads(threads), _diverged_model_error():
            torch.manual_seed(call_seed)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            if cached_loop:
                new_tokens = sample_tokens(
                    model,
                    input_ids,
                    attention_mask,
                    limits,
                    sampling_processors(self.temperature, self.top_k, self.top_p),
                    self.eos_token_ids,
                    self.pad_token_id,
                )
            else:
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=self.generation_config(most),
                    stopping_criteria=StoppingCriteriaList([_PerRowLimit(width, limits)]),
                )
                new_tokens = output[:, width:]
        return [self._trim(tokens, limit) for tokens, limit in zip(new_tokens.tolist(), max_new_tokens)]

    def _trim(self, tokens: list[int], limit: int) -> list[int]:
        tokens = tokens[:limit]
        return _cut_after_first(tokens, self.eos_token_ids)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator_state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator_state"])


@contextlib.contextmanager
def _diverged_model_error():
    """Turn torch's sampling error on NaN or infinite probabilities (a model whose weights
    diverged) into a ``FloatingPointError``, which the CLI reports in one line."""
    try:
        yield
    except RuntimeError as error:
        if "probability tensor contains" not in str(error):
            raise
        raise FloatingPointError(
            "the sampling model's next-token probabilities are not finite (its weights diverged): "
            "lower the learning rate, raise ema_decay or train in float32"
        ) from error


@contextlib.contextmanager
def _intra_op_threads(count: int | None):
    """Run the block with ``count`` torch intra-op threads (``None``: unchanged), then restore."""
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cut_after_first(tokens: list[int], stop_ids: Iterable[int]) -> list[int]:
    stop = set(stop_ids)
    for position, token in enumerate(tokens):
        if token in stop:
            return tokens[: position + 1]
    return tokens


def self_augmented_pairs(
    model: torch.nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    sampler: SegmentGenerator,
    cut_generator: torch.Generator,
    segment_length: int,
    max_length: int | None,
) -> tuple[list[dict[str, list[int]]], int]:
    """SAPO's negatives for ``(prompt_ids, gold_ids)`` rows: draw a cut per row, let ``model``
    rewrite one window of each gold answer in one batched call, splice the rejected answers.

    Returns the pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) and the number of tokens
    generated.
    """
    cuts = [sample_cut(len(p), len(g), segment_length, max_length, cut_generator) for p, g in rows]
    prefixes = [list(p) + list(g[:cut]) for (p, g), (cut, _) in zip(rows, cuts)]
    segments = sampler.generate(model, prefixes, [window for _, window in cuts])
    pairs = [
        {
            "prompt_ids": list(p),
            "chosen_ids": list(g),
            "rejected_ids": splice(g, cut, segment, segment_length, sampler.eos_token_ids),
        }
        for (p, g), (cut, _), segment in zip(rows, cuts, segments)
    ]
    return pairs, sum(len(segment) for segment in segments)
