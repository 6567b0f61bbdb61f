"""Time one optimizer step of TRL's DPOTrainer and of SAPOTrainer on the same tiny Llama and pairs.

Methods, each run through its trainer's real ``train()`` loop:

- ``trl_dpo``: a ``trl.DPOTrainer`` step on ready-made pairs (explicit reference model);
- ``sapo_update``: a SAPOTrainer step without generation (buffer pre-filled with the same pairs),
  scoring each pair in one packed row (``sapo.packing``, the trainer's choice under ``sdpa``);
- ``sapo_update_unpacked``: the same, scoring chosen and rejected as two padded rows
  (``pair_scoring="padded"``), to show what packing buys;
- ``sapo_total``: the whole SAPO step, the EMA model sampling ``segment_length`` tokens per row
  with SAPO's sampling loop (``sapo.sampling.own_loop``);
- ``sapo_total_unpacked``: the whole step, unpacked;
- ``sapo_total_generate``: the whole step, sampling with transformers' ``generate``
  (``generation_backend="transformers"``);
- ``sapo_total_gen_1_thread``: the whole step, generating with one torch thread
  (``generation_num_threads=1``).

``benchmarks/generation_time.py`` times the generation options (static cache, compile, ...) alone.

Each SAPO method sets ``pair_scoring`` itself, so the comparison does not depend on which layout
the trainer picks by default. The update-only methods use a trainer whose ``generate_pairs`` does
nothing, on a buffer filled with the same pairs.

A step is timed by a ``TrainerCallback`` (``step_time_parts.StepTimer``) from the end of the
previous step's logging to ``on_step_end``: Trainer's fetch of the batch, SAPO's generation
(wherever the trainer runs it), forward, backward, optimizer, and SAPO's EMA update and reference
sync; "begin->end" is ``on_step_begin`` → ``on_step_end`` alone. The first ``--warmup`` steps of every
``train()`` call are skipped. Generation throughput comes from the trainer's own logged
``sapo/generation_seconds`` and ``sapo/segment_tokens``. Methods are interleaved over
``--rounds`` so that a change in background load hits all of them alike, in a new order each
round, so that no method always runs right after the same one; figures are medians
over all measured steps ("vs trl_dpo": ratio of those medians), and "paired" is the median over
rounds of each round's ratio, which a drift in the machine's speed between rounds does not move.
"work vs trl" is what the step asks of the models, whatever it costs: the token positions
through the policy (a forward and backward, counted three times) and the reference (once) per
step, padding included, over TRL's. Where a step's time is proportional to the positions its
models process, its time ratio is this one. The last line printed is one JSON object.

    python -m benchmarks.step_time            # default setting (about 5 minutes on 2 quiet CPU cores)
    python -m benchmarks.step_time --quick    # a short run to check that it works
    python -m benchmarks.step_time --methods sapo_update sapo_update_unpacked --vocab_size 32000
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import warnings

if not __package__:  # started as a file: run as the module (benchmarks/__init__.py)
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.step_time", *sys.argv[1:]])

import datasets
import torch
import transformers
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, DPOTrainer

from benchmarks import harness
from benchmarks.step_time_parts import PositionCounter, StepTimer, as_text, make_pairs, work_units
from sapo import SAPOConfig, SAPOTrainer
from sapo.builtin.settings import tiny_run_args
from sapo.builtin.tiny import char_tokenizer, tiny_llama

# SAPO methods: what differs from the trainer's defaults (packed scoring, SAPO's sampling loop,
# torch's threads)
METHODS = {
    "trl_dpo": None,
    "sapo_update": dict(generate=False),
    "sapo_update_unpacked": dict(generate=False, pair_scoring="padded"),
    "sapo_total": dict(generate=True),
    "sapo_total_unpacked": dict(generate=True, pair_scoring="padded"),
    "sapo_total_generate": dict(generate=True, generation_backend="transformers"),
    "sapo_total_gen_1_thread": dict(generate=True, generation_num_threads=1),
}


class UpdateOnlyTrainer(SAPOTrainer):
    """A SAPOTrainer that generates nothing: it trains on the buffer the benchmark filled."""

    def generate_pairs(self, rows, step):
        pass


def common_args(output_dir: str, batch_size: int, max_steps: int) -> dict:
    # logging at every step: the timer reads the reference reuse from each step's log
    return tiny_run_args(
        output_dir, max_steps, batch_size, 1e-5, optim="adamw_torch", logging_steps=1,
        activation_checkpointing=False, dataloader_num_workers=0,
    )  # fmt: skip


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
        [getattr(pair, key) for key in keys] for pair in pairs
    ]:
        raise RuntimeError("TRL tokenized the benchmark pairs differently; the comparison would be unfair")
    return trainer


def build_sapo(policy, tokenizer, pairs, settings, output_dir, options: dict):
    generate = options["generate"]
    args = SAPOConfig(
        **common_args(output_dir, settings.batch_size, settings.warmup + settings.steps),
        loss_type="dpo",
        beta=0.1,
        segment_length=settings.segment_length,
        sample_every_n_steps=1,
        max_length=settings.prompt_length + settings.completion_length,
        max_prompt_length=settings.prompt_length,
        **{name: value for name, value in options.items() if name != "generate"},
    )
    rows = as_text(tokenizer, pairs).rename_column("chosen", "completion").remove_columns("rejected")
    trainer = (SAPOTrainer if generate else UpdateOnlyTrainer)(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(policy),
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
    )
    if trainer.train_dataset["gold_ids"] != [pair.chosen_ids for pair in pairs]:
        raise RuntimeError("SAPO tokenized the benchmark rows differently; the comparison would be unfair")
    if not generate:  # copies: a trainer caches its reference log-probs on the pairs it holds
        for pair in pairs:
            trainer.buffer.add(copy.copy(pair))
    return trainer


def run_method(method, policy, tokenizer, pairs, settings, results):
    with tempfile.TemporaryDirectory() as output_dir:
        if METHODS[method] is None:
            trainer = build_trl(policy, tokenizer, pairs, settings, output_dir)
        else:
            trainer = build_sapo(policy, tokenizer, pairs, settings, output_dir, METHODS[method])
        trainer.remove_callback(PrinterCallback)
        timer = StepTimer(settings.warmup)
        trainer.add_callback(timer)  # last, so SAPO's own step-end work falls inside the step
        counters = {
            role: PositionCounter(model, tokenizer.pad_token_id)
            for role, model in (("policy", trainer.model), ("reference", trainer.ref_model))
        }
        trainer.train()
    for role, counter in counters.items():
        results[method][f"{role}_positions"] += counter.positions / trainer.state.global_step
        results[method][f"{role}_tokens"] += counter.tokens / trainer.state.global_step
    results[method]["steps"] += timer.steps
    results[method]["round_medians"].append(statistics.median(timer.steps))
    results[method]["windows"] += timer.windows
    results[method]["cpu_steps"] += timer.cpu_steps
    results[method]["reference_reuse"] += timer.reference_reuse
    results[method]["generated_tokens"] += timer.generated_tokens
    results[method]["generation_seconds"] += timer.generation_seconds


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of 3 steps: checks that it runs")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all methods")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per method and round")
    parser.add_argument("--warmup", type=int, default=2, help="steps skipped at the start of each run")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--completion_length", type=int, default=64)
    parser.add_argument("--segment_length", type=int, default=32)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--intermediate_size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument(
        "--vocab_size", type=int, help="model vocabulary (default: the tokenizer's 102); ids stay below 102"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        help="methods to run (trl_dpo always)",
    )
    settings = parser.parse_args()
    settings.methods = ["trl_dpo", *(m for m in settings.methods if m != "trl_dpo")]
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
    load_before = harness.load_average()
    tokenizer = char_tokenizer()
    model_config = dict(
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
    )
    if settings.vocab_size:
        model_config["vocab_size"] = settings.vocab_size
    policy = tiny_llama(tokenizer, seed=0, **model_config)
    parameters = sum(p.numel() for p in policy.parameters())
    # enough rows that no step of a run repeats a batch of the data loader
    count = settings.batch_size * (settings.warmup + settings.steps)
    pairs = make_pairs(
        tokenizer, count, settings.prompt_length, settings.completion_length, settings.segment_length, seed=0
    )
    methods = settings.methods
    results = {
        method: {
            "steps": [],
            "round_medians": [],
            "windows": [],
            "cpu_steps": [],
            "reference_reuse": [],
            "generated_tokens": 0,
            "generation_seconds": 0.0,
            "policy_positions": 0.0,  # summed over rounds: token positions per step
            "reference_positions": 0.0,
            "policy_tokens": 0.0,  # the same without padding
            "reference_tokens": 0.0,
        }
        for method in methods
    }
    for round_index in range(settings.rounds):
        # a new order each round (fixed by the round's number), so no method always follows the same one
        for method in random.Random(round_index).sample(methods, len(methods)):
            run_method(method, policy, tokenizer, pairs, settings, results)

    def median_ms(method, key="steps"):
        return 1000 * statistics.median(results[method][key])

    steps = {method: median_ms(method) for method in methods}
    windows = {method: median_ms(method, "windows") for method in methods}
    cpu_steps = {method: median_ms(method, "cpu_steps") for method in methods}
    generation = {  # segment tokens per second, per generating method
        method: round(results[method]["generated_tokens"] / results[method]["generation_seconds"], 1)
        for method in methods
        if results[method]["generation_seconds"] > 0
    }
    reuse = {
        method: round(statistics.mean(results[method]["reference_reuse"]), 3)
        for method in methods
        if results[method]["reference_reuse"]
    }

    def per_step(kind):  # token positions per step (kind "positions") or non-padding tokens ("tokens")
        return {
            method: {
                role: results[method][f"{role}_{kind}"] / settings.rounds for role in ("policy", "reference")
            }
            for method in methods
        }

    positions, tokens = per_step("positions"), per_step("tokens")
    work = {method: work_units(counts["policy"], counts["reference"]) for method, counts in positions.items()}
    unpadded_work = {method: work_units(c["policy"], c["reference"]) for method, c in tokens.items()}

    def ratio(method, baseline="trl_dpo"):
        both = method in steps and baseline in steps
        return round(steps[method] / steps[baseline], 4) if both else None

    def paired_ratio(method, baseline="trl_dpo"):
        """Median over rounds of the round's ratio: methods of one round ran minutes apart at
        most, so a drift in the machine's speed between rounds cancels out."""
        rounds = zip(results[method]["round_medians"], results[baseline]["round_medians"])
        return round(statistics.median(a / b for a, b in rounds), 4)

    measured_on = harness.machine(load_before)
    print(
        f"tiny Llama {parameters / 1e6:.2f}M parameters ({model_config}); batch {settings.batch_size}, "
        f"prompt {settings.prompt_length}, completion {settings.completion_length}, segment "
        f"{settings.segment_length}; {settings.rounds} round(s) x {settings.steps} steps per method"
    )
    print(harness.describe(measured_on))
    header = ("method", "step ms", "vs trl_dpo", "paired", "begin->end", "CPU ms", "CPU vs trl")
    header += ("ref reuse", "work vs trl")
    print(f"{header[0]:<24}" + "".join(f"{name:>14}" for name in header[1:]))
    for method in methods:
        cells = (
            f"{steps[method]:.1f}",
            f"{ratio(method):.3f}",
            f"{paired_ratio(method):.3f}",
            f"{windows[method]:.1f}",
            f"{cpu_steps[method]:.1f}",
            f"{cpu_steps[method] / cpu_steps['trl_dpo']:.3f}",
            f"{reuse[method]:.0%}" if method in reuse else "-",
            f"{work[method] / work['trl_dpo']:.3f}",
        )
        print(f"{method:<24}" + "".join(f"{cell:>14}" for cell in cells))
    print(
        "work without padding (vs trl_dpo): "
        + ", ".join(f"{method} {unpadded_work[method] / work['trl_dpo']:.3f}" for method in methods)
    )
    for method, tokens_per_second in generation.items():
        print(f"generation ({method}): {tokens_per_second:.0f} segment tokens/s (sapo/generation_seconds)")
    comparisons = {  # each optimization on its own: the step with it over the step without it
        "packed_vs_unpacked_update": ratio("sapo_update", "sapo_update_unpacked"),
        "packed_vs_unpacked_total": ratio("sapo_total", "sapo_total_unpacked"),
        "generation_1_thread_vs_default_total": ratio("sapo_total_gen_1_thread", "sapo_total"),
        "sapo_loop_vs_generate_total": ratio("sapo_total", "sapo_total_generate"),
    }
    for name, value in comparisons.items():
        if value is not None:
            print(f"{name}: {value:.3f}")

    summary = {
        "update_vs_trl_dpo": ratio("sapo_update"),
        "total_vs_trl_dpo": ratio("sapo_total"),
        **{f"{method}_vs_trl_dpo": ratio(method) for method in methods if method not in ("trl_dpo",)},
        "paired_vs_trl_dpo": {method: paired_ratio(method) for method in methods if method != "trl_dpo"},
        **comparisons,
        "median_step_ms": {method: round(value, 2) for method, value in steps.items()},
        "median_begin_to_end_ms": {method: round(value, 2) for method, value in windows.items()},
        "median_step_cpu_ms": {method: round(value, 2) for method, value in cpu_steps.items()},
        "reference_reuse": reuse,
        "positions_per_step": {
            m: {r: round(v, 1) for r, v in counts.items()} for m, counts in positions.items()
        },
        "work_vs_trl_dpo": {method: round(work[method] / work["trl_dpo"], 4) for method in methods},
        "tokens_per_step": {m: {r: round(v, 1) for r, v in counts.items()} for m, counts in tokens.items()},
        "unpadded_work_vs_trl_dpo": {m: round(unpadded_work[m] / work["trl_dpo"], 4) for m in methods},
        "generation_tokens_per_s": generation,
        "measured_steps_per_method": len(results["trl_dpo"]["steps"]),
        "model_parameters": parameters,
        "model": model_config,
        "batch_size": settings.batch_size,
        "prompt_length": settings.prompt_length,
        "completion_length": settings.completion_length,
        "segment_length": settings.segment_length,
        "quick": settings.quick,
        "machine": measured_on,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
