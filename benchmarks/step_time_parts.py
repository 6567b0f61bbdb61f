"""Pieces of ``step_time.py`` that ``large_vocab.py`` shares: the step timer, the benchmark's pairs,
and the count of token positions through a model.

Nothing here depends on which trainer runs: the timer is a ``TrainerCallback``, the counter a
forward pre-hook.
"""

from __future__ import annotations

import random
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback

from sapo.pairs import Pair
from sapo.segments import sample_cut, splice

TEXT_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def clocks() -> tuple[float, float]:
    """Wall-clock and this process's CPU seconds: CPU time moves less when other jobs share the
    cores, so it backs up wall-clock ratios measured on a busy machine."""
    return time.perf_counter(), time.process_time()


class StepTimer(TrainerCallback):
    """Per optimizer step, wall-clock and CPU seconds, through Trainer's callbacks alone.

    A step runs from the end of the previous step's last hook (``on_step_end``, or ``on_log`` when
    the step logged) to this step's ``on_step_end``: it takes in Trainer's fetch of the batch
    (before ``on_step_begin``), SAPO's generation, the forward, backward and optimizer step, and
    the callbacks that run before this one at ``on_step_end`` (add it last), and leaves out
    the previous step's logging. ``windows`` holds ``on_step_begin`` → ``on_step_end`` alone.
    The first ``warmup`` steps are not recorded. From SAPO's logged metrics (log every step) it
    keeps the share of reused reference log-probs and the generation seconds and segment tokens.
    """

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.steps: list[float] = []
        self.cpu_steps: list[float] = []
        self.windows: list[float] = []
        self.reference_reuse: list[float] = []
        self.generation_seconds = 0.0
        self.generated_tokens = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.ended = clocks()

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = clocks()

    def on_step_end(self, args, state, control, **kwargs):
        wall, cpu = clocks()
        if state.global_step > self.warmup:
            self.windows.append(wall - self.began[0])
            self.steps.append(wall - self.ended[0])
            self.cpu_steps.append(cpu - self.ended[1])
        self.ended = clocks()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step > self.warmup and logs:
            if "sapo/reference_reuse" in logs:
                self.reference_reuse.append(logs["sapo/reference_reuse"])
            if "sapo/generation_seconds" in logs:  # one generation call per step when logged every step
                self.generation_seconds += logs["sapo/generation_seconds"]
                self.generated_tokens += logs["sapo/segment_tokens"]
        self.ended = clocks()  # the next step begins after this step's logging


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
        pairs.append(Pair(prompt, gold, splice(gold, cut, segment, segment_length, eos)))
    return pairs


def as_text(tokenizer, pairs) -> Dataset:
    """The pairs as strings (one character per token), for trainers that tokenize themselves."""
    sides = ("prompt", "chosen", "rejected")
    rows = [{side: tokenizer.decode(getattr(pair, f"{side}_ids")) for side in sides} for pair in pairs]
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
