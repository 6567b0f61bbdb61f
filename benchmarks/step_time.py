"""Time one optimizer step of TRL's DPOTrainer and of SAPOTrainer on the same tiny Llama and pairs.

Methods, each run through its trainer's real ``train()`` loop:

- ``trl_dpo``: a ``trl.DPOTrainer`` step on ready-made pairs (explicit reference model);
- ``sapo_update``: a SAPOTrainer step without generation (buffer pre-filled with the same pairs),
  scoring each pair in one packed row (``sapo.packing``, the trainer's choice under ``sdpa``);
- ``sapo_update_unpacked``: the same, scoring chosen and rejected as two padded rows
  (``sapo.logprobs``), to show what packing buys;
- ``sapo_total``: the whole SAPO step, the EMA model sampling ``segment_length`` tokens per row;
- ``sapo_total_unpacked``: the whole step, unpacked.

Each SAPO method sets the trainer's collate and scoring functions itself, so the comparison does
not depend on which one the trainer picks by default.

A step is timed as Trainer's ``get_batch_samples`` call (where SAPO generates, before
``on_step_begin``) plus ``on_step_begin`` → ``on_step_end`` (forward, backward, optimizer, and
SAPO's EMA update and reference sync, whose callback runs before the timer's). The first
``--warmup`` steps of every ``train()`` call are skipped. Methods are interleaved over
``--rounds`` so that a change in background load hits all of them alike; figures are medians
over all measured steps. The last line printed is one JSON object.

    python benchmarks/step_time.py            # default setting (5-15 minutes on 2 busy CPU cores)
    python benchmarks/step_time.py --quick    # a short run to check that it works
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import random
import statistics
import tempfile
import time
import warnings

import datasets
import torch
import transformers
import trl
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, DPOTrainer

from sapo import SAPOConfig, SAPOTrainer
from sapo.logprobs import collate_pairs, completion_logps
from sapo.packing import pack_pairs, packed_completion_logps
from sapo.segments import sample_cut, splice
from sapo.tiny import char_tokenizer, tiny_llama

METHODS = ("trl_dpo", "sapo_update", "sapo_update_unpacked", "sapo_total", "sapo_total_unpacked")
SCORING = {  # (collate, score) for the policy and the reference
    "packed": (pack_pairs, packed_completion_logps),
    "unpacked": (collate_pairs, completion_logps),
}
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
            if isinstance(self.trainer, SAPOTrainer):  # its metrics pile up until the next log
                self.reference_reuse.append(self.trainer._metrics["sapo/reference_reuse"][-1])


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


def common_args(output_dir: str, batch_size: int, max_steps: int) -> dict:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        learning_rate=1e-5,
        optim="adamw_torch",
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def build_trl(policy, tokenizer, pairs, settings, output_dir):
    args = DPOConfig(
        **common_args(output_dir, settings.batch_size, settings.warmup + settings.steps), beta=0.1
    )
    args.max_length = None  # no truncation: every method sees the same full sequences
    trainer = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(policy),
        args=args,
        train_dataset=as_text(tokenizer, pairs),
        processing_class=tokenizer,
    )
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    if [[row[key] for key in keys] for row in trainer.train_dataset] != [
        [pair[key] for key in keys] for pair in pairs
    ]:
        raise RuntimeError("TRL tokenized the benchmark pairs differently; the comparison would be unfair")
    return trainer


def build_sapo(policy, tokenizer, pairs, settings, output_dir, generate: bool):
    args = SAPOConfig(
        **common_args(output_dir, settings.batch_size, settings.warmup + settings.steps),
        loss_type="dpo",
        beta=0.1,
        segment_length=settings.segment_length,
        sample_every_n_steps=1,
        max_length=settings.prompt_length + settings.completion_length,
        max_prompt_length=settings.prompt_length,
    )
    rows = as_text(tokenizer, pairs).rename_column("chosen", "completion").remove_columns("rejected")
    trainer = SAPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(policy),
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
    )
    if trainer.train_dataset["gold_ids"] != [pair["chosen_ids"] for pair in pairs]:
        raise RuntimeError("SAPO tokenized the benchmark rows differently; the comparison would be unfair")
    if not generate:
        for pair in pairs:
            trainer.buffer.add(dict(pair))
        trainer._generate_pairs = lambda rows, step: None
    return trainer


def run_method(method, policy, tokenizer, pairs, settings, results):
    with tempfile.TemporaryDirectory() as output_dir:
        if method == "trl_dpo":
            trainer = build_trl(policy, tokenizer, pairs, settings, output_dir)
        else:
            generate = method.startswith("sapo_total")
            trainer = build_sapo(policy, tokenizer, pairs, settings, output_dir, generate)
            collate, trainer._score = SCORING["unpacked" if method.endswith("_unpacked") else "packed"]
            trainer._collate = functools.partial(collate, pad_token_id=tokenizer.pad_token_id)
        trainer.remove_callback(PrinterCallback)
        timer = StepTimer(trainer, settings.warmup)
        meter = GenerationMeter(trainer.segment_generator) if method.startswith("sapo_total") else None
        trainer.train()
    results[method]["steps"] += timer.steps
    results[method]["windows"] += timer.windows
    results[method]["cpu_steps"] += timer.cpu_steps
    results[method]["reference_reuse"] += timer.reference_reuse
    if meter is not None:
        results[method]["generated_tokens"] += meter.tokens
        results[method]["generation_seconds"] += meter.seconds


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of 3 steps: checks that it runs")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all methods")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per method and round")
    parser.add_argument("--warmup", type=int, default=2, help="steps skipped at the start of each run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--segment-length", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    settings = parser.parse_args()
    if settings.quick:
        settings.rounds, settings.steps, settings.warmup = 1, 3, 1
    return settings


def main():
    settings = parse_args()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from the libraries
    datasets.disable_progress_bars()
    load_before = os.getloadavg()
    tokenizer = char_tokenizer()
    model_config = dict(
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
    )
    policy = tiny_llama(tokenizer, seed=0, **model_config)
    parameters = sum(p.numel() for p in policy.parameters())
    # enough rows that no step of a run repeats a batch of the data loader
    count = settings.batch_size * (settings.warmup + settings.steps)
    pairs = make_pairs(
        tokenizer, count, settings.prompt_length, settings.completion_length, settings.segment_length, seed=0
    )
    results = {
        method: {
            "steps": [],
            "windows": [],
            "cpu_steps": [],
            "reference_reuse": [],
            "generated_tokens": 0,
            "generation_seconds": 0.0,
        }
        for method in METHODS
    }
    for _ in range(settings.rounds):
        for method in METHODS:
            run_method(method, policy, tokenizer, pairs, settings, results)

    def median_ms(method, key="steps"):
        return 1000 * statistics.median(results[method][key])

    steps = {method: median_ms(method) for method in METHODS}
    windows = {method: median_ms(method, "windows") for method in METHODS}
    cpu_steps = {method: median_ms(method, "cpu_steps") for method in METHODS}
    generated = results["sapo_total"]["generated_tokens"] + results["sapo_total_unpacked"]["generated_tokens"]
    generation_seconds = (
        results["sapo_total"]["generation_seconds"] + results["sapo_total_unpacked"]["generation_seconds"]
    )
    tokens_per_second = generated / generation_seconds
    reuse = {
        method: round(statistics.mean(results[method]["reference_reuse"]), 3)
        for method in METHODS
        if results[method]["reference_reuse"]
    }
    baseline = steps["trl_dpo"]

    print(
        f"tiny Llama {parameters / 1e6:.2f}M parameters ({model_config}); batch {settings.batch_size}, "
        f"prompt {settings.prompt_length}, completion {settings.completion_length}, segment "
        f"{settings.segment_length}; {settings.rounds} round(s) x {settings.steps} steps per method; "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    header = ("method", "step ms", "vs trl_dpo", "begin->end ms", "CPU ms", "CPU vs trl", "ref reuse")
    print(f"{header[0]:<20}" + "".join(f"{name:>15}" for name in header[1:]))
    for method in METHODS:
        cells = (
            f"{steps[method]:.1f}",
            f"{steps[method] / baseline:.3f}",
            f"{windows[method]:.1f}",
            f"{cpu_steps[method]:.1f}",
            f"{cpu_steps[method] / cpu_steps['trl_dpo']:.3f}",
            f"{reuse[method]:.0%}" if method in reuse else "-",
        )
        print(f"{method:<20}" + "".join(f"{cell:>15}" for cell in cells))
    print(
        f"generation: {tokens_per_second:.0f} segment tokens/s "
        f"({generated} tokens in {generation_seconds:.2f} s)"
    )
    print(
        f"packed vs unpacked: update step {steps['sapo_update'] / steps['sapo_update_unpacked']:.3f}, "
        f"whole step {steps['sapo_total'] / steps['sapo_total_unpacked']:.3f}"
    )

    summary = {
        "update_vs_trl_dpo": round(steps["sapo_update"] / baseline, 4),
        "total_vs_trl_dpo": round(steps["sapo_total"] / baseline, 4),
        "unpacked_update_vs_trl_dpo": round(steps["sapo_update_unpacked"] / baseline, 4),
        "unpacked_total_vs_trl_dpo": round(steps["sapo_total_unpacked"] / baseline, 4),
        "packed_vs_unpacked_update": round(steps["sapo_update"] / steps["sapo_update_unpacked"], 4),
        "packed_vs_unpacked_total": round(steps["sapo_total"] / steps["sapo_total_unpacked"], 4),
        "median_step_ms": {method: round(value, 2) for method, value in steps.items()},
        "median_begin_to_end_ms": {method: round(value, 2) for method, value in windows.items()},
        "median_step_cpu_ms": {method: round(value, 2) for method, value in cpu_steps.items()},
        "reference_reuse": reuse,
        "generation_tokens_per_s": round(tokens_per_second, 1),
        "measured_steps_per_method": len(results["trl_dpo"]["steps"]),
        "model_parameters": parameters,
        "model": model_config,
        "batch_size": settings.batch_size,
        "prompt_length": settings.prompt_length,
        "completion_length": settings.completion_length,
        "segment_length": settings.segment_length,
        "quick": settings.quick,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
