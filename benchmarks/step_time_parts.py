"""Pieces of ``step_time.py``: step and generation timers, and the benchmark's pairs.

Kept apart so the benchmark script stays short; nothing here depends on which trainer runs.
"""

from __future__ import annotations

import random
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback

from sapo.segments import sample_cut, splice

TEXT_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def clocks() -> tuple[float, float]:
    """Wall-clock and this process's CPU seconds: CPU time moves less when other jobs share the
    cores, so it backs up wall-clock ratios measured on a busy machine."""
    return time.perf_counter(), time.process_time()


class StepTimer(TrainerCallback):
    """Per optimizer step: ``get_batch_samples`` plus ``on_step_begin`` → ``on_step_end``, in
    wall-clock and CPU seconds."""

    def __init__(self, trainer, warmup: int):
        self.warmup = warmup
        self.fetch = (0.0, 0.0)
        self.steps: list[float] = []
        self.cpu_steps: list[float] = []
        self.windows: list[float] = []
        # SAPO: share of the batch whose reference log-probs were cached
        self.reference_reuse: list[float] = []
        self.trainer = trainer
        fetch = trainer.get_batch_samples

        def timed_fetch(*args, **kwargs):
            wall, cpu = clocks()
            result = fetch(*args, **kwargs)
            self.fetch = (time.perf_counter() - wall, time.process_time() - cpu)
            return result

        trainer.get_batch_samples = timed_fetch  # the loop calls it once per optimizer step
        trainer.add_callback(self)  # last, so SAPO's EMA/reference callback runs inside the window

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = clocks()

    def on_step_end(self, args, state, control, **kwargs):
        wall, cpu = time.perf_counter() - self.began[0], time.process_time() - self.began[1]
        if state.global_step > self.warmup:
            self.windows.append(wall)
            self.steps.append(self.fetch[0] + wall)
            self.cpu_steps.append(self.fetch[1] + cpu)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # SAPO logs the share of reused reference log-probs; the benchmark logs every step
        if state.global_step > self.warmup and logs and "sapo/reference_reuse" in logs:
            self.reference_reuse.append(logs["sapo/reference_reuse"])


class GenerationMeter:
    """Wraps a SegmentGenerator's ``generate`` to count the segment tokens and the seconds."""

    def __init__(self, generator):
        self.tokens, self.seconds = 0, 0.0
        generate = generator.generate

        def timed_generate(*args, **kwargs):
            started = time.perf_counter()
            segments = generate(*args, **kwargs)
            self.seconds += time.perf_counter() - started
            self.tokens += sum(len(segment) for segment in segments)
            return segments

        generator.generate = timed_generate


def make_pairs(
    tokenizer, count: int, prompt_length: int, completion_length: int, segment_length: int, seed: int
):
    """``count`` pairs as SAPO builds them: gold ends in EOS; a random segment replaces
    ``segment_length`` gold tokens at a uniform cut. A segment that replaces the gold's end ends
    in EOS itself, so every rejected answer ends in EOS (TRL would append one otherwise) and is as
    long as its gold."""
    rng = random.Random(seed)
    cut_generator = torch.Generator().manual_seed(seed)
    vocab = tokenizer.get_vocab()
    letters = [vocab[character] for character in TEXT_CHARACTERS]
    eos = tokenizer.eos_token_id
    pairs = []
    for _ in range(count):
        prompt = [rng.choice(letters) for _ in range(prompt_length)]
        gold = [rng.choice(letters) for _ in range(completion_length - 1)] + [eos]
        cut, window = sample_cut(prompt_length, completion_length, segment_length, None, cut_generator)
        segment = [rng.choice(letters) for _ in range(window)]
        if cut + window == completion_length:
            segment[-1] = eos
        pairs.append(
            {
                "prompt_ids": prompt,
                "chosen_ids": gold,
                "rejected_ids": splice(gold, cut, segment, segment_length, eos),
                "step": 0,
            }
        )
    return pairs


def as_text(tokenizer, pairs) -> Dataset:
    """The pairs as strings (one character per token), for trainers that tokenize themselves."""
    rows = [
        {side: tokenizer.decode(pair[f"{side}_ids"]) for side in ("prompt", "chosen", "rejected")}
        for pair in pairs
    ]
    return Dataset.from_list(rows)


class PositionCounter:
    """Token positions that go through a model's forward: the work a step does, whatever it
    costs. Counts the ``input_ids`` of every call of ``model``'s forward, and apart the ones
    that are not padding (``pad_token_id``, which the benchmark's texts never contain)."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int):
        self.positions, self.tokens = 0, 0
        self.pad_token_id = pad_token_id
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            self.positions += input_ids.numel()
            self.tokens += int((input_ids != self.pad_token_id).sum())


def work_units(policy_positions: float, reference_positions: float) -> float:
    """A forward and backward is about three forwards' work; a reference forward is one."""
    return 3 * policy_positions + reference_positions
