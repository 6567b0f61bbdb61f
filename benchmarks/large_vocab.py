"""Time and peak memory of SAPO's update step and whole step against TRL's DPO step, vocabulary 151,936.

At such vocabularies the language-model head dominates a preference step: ``benchmarks/
step_time.py``'s 102-token vocabulary hides it. Both trainers get a config-built Llama whose
output layer spans Qwen2's 151,936 tokens (hidden size 128, 2 layers, tied embeddings: small
enough for 2 CPU cores, and head-dominated as a real model's logits are at this vocabulary), the
same pairs (prompt 256 + answer 256 tokens, batch 4; the rejected answer is the gold one with a
``--segment_length`` window rewritten at a uniform cut, as SAPO builds it) and the same run
settings (AdamW, float32, an explicit reference model), each through its trainer's real
``train()`` loop:

- ``trl_dpo``: ``trl.DPOTrainer``;
- ``sapo_update``: ``SAPOTrainer`` (DPO) with its defaults, on a buffer filled with the same pairs
  and a ``generate_pairs`` that does nothing (``step_time.UpdateOnlyTrainer``): the update step
  alone (loss, optimizer, EMA update);
- ``sapo_total``: ``SAPOTrainer`` with its defaults, generating its own pairs from the same rows
  (the EMA model rewrites a 128-token segment of each gold answer at a uniform cut, sampled by
  SAPO's loop, then the update step): the whole SAPO step. The last line's ``total_vs_trl_dpo``
  is its median step over TRL's, with the generation seconds per step and the segment tokens per
  second of generation (SAPO's logged ``sapo/generation_seconds`` and ``sapo/segment_tokens``);
- ``sapo_total_torch_threads`` (not run by default): the same, sampling with torch's threads
  instead of one (``generation_num_threads=None``);
- ``sapo_update_unchunked`` (not run by default): the same with ``logprob_chunk_size=0``, the
  LM head over all scored positions at once;
- ``scoring`` and ``scoring_full_sums`` (not run by default): the policy's packed scoring alone, a
  forward and backward of ``sapo.packing.packed_completion_logps`` per batch of 4 pairs (no
  optimizer), packed as the DPO trainer packs (the shared prefix left out) and with the shared
  prefix's tokens scored too (``score_shared_prefix=True``, ORPO's packing): what leaving them
  out saves.

Every configuration runs in a fresh Python process (``baseline`` builds the model and the pairs
and does not train), so that peaks do not mix (:mod:`benchmarks.harness`). Memory is the
process's peak resident memory above the baseline's; time is the median over the measured steps
of ``step_time_parts.StepTimer`` (a ``TrainerCallback``: the batch fetch plus ``on_step_begin`` →
``on_step_end``), wall-clock and CPU. "head positions" are the positions whose logits a step's policy forward
computes per pair: TRL's fused head scores every position of both rows on CPU (its compact mode,
completion positions only, needs Triton: a GPU), SAPO the positions after the shared prefix.
The last line printed is one JSON object.

    python -m benchmarks.large_vocab            # default setting: 4 minutes on 2 quiet cores, 18 on busy ones
    python -m benchmarks.large_vocab --quick    # a small vocabulary and short pairs: checks that it runs
    python -m benchmarks.large_vocab --configs trl_dpo sapo_update sapo_update_unchunked

A SAPO configuration is one entry of ``SAPO_OPTIONS``: the options ``step_time.build_sapo`` gets
(``generate``: whether the trainer samples its own pairs, then ``SAPOConfig`` fields).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace

if not __package__:  # started as a file: run as the module (benchmarks/__init__.py)
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.large_vocab", *sys.argv[1:]])

from benchmarks import harness

SAPO_OPTIONS = {
    "sapo_update": {"generate": False},
    "sapo_update_unchunked": {"generate": False, "logprob_chunk_size": 0},
    "sapo_total": {"generate": True},
    "sapo_total_torch_threads": {"generate": True, "generation_num_threads": None},
}
CONFIGS = ("baseline", "trl_dpo", *SAPO_OPTIONS, "scoring", "scoring_full_sums")
DEFAULT_CONFIGS = ("trl_dpo", "sapo_update", "sapo_total")


# ---------------------------------------------------------------------------------------------
# worker: one configuration in a fresh process
# ---------------------------------------------------------------------------------------------


def run_worker(config: str, settings: dict) -> dict:
    import datasets
    import torch
    import transformers
    from transformers.trainer_callback import PrinterCallback

    from benchmarks.step_time import build_sapo, build_trl
    from benchmarks.step_time_parts import StepTimer, make_pairs
    from sapo.builtin.tiny import char_tokenizer, tiny_llama
    from sapo.packing import pack_pairs

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)
    tokenizer = char_tokenizer()
    policy = tiny_llama(tokenizer, seed=0, vocab_size=settings["vocab_size"], **settings["model"])
    run = SimpleNamespace(**settings)
    # enough pairs that no step of the run repeats a batch of TRL's data loader
    pairs = make_pairs(
        tokenizer, run.batch_size * (run.warmup + run.steps), run.prompt_length, run.completion_length,
        run.segment_length, seed=0,
    )  # fmt: skip
    result = {"config": config, "parameters": sum(p.numel() for p in policy.parameters())}
    head_positions = [
        pack_pairs([pair], tokenizer.pad_token_id, score_shared_prefix=False)["scored_positions"].numel()
        for pair in pairs
    ]
    result["sapo_head_positions_per_pair"] = statistics.mean(head_positions)
    result["trl_head_positions_per_pair"] = 2 * (run.prompt_length + run.completion_length - 1)
    if config == "baseline":
        return {**result, "peak_mib": harness.peak_mib()}
    if config.startswith("scoring"):
        return {**result, **time_scoring(policy, tokenizer, pairs, run, config == "scoring_full_sums")}
    with tempfile.TemporaryDirectory() as output_dir:
        if config == "trl_dpo":
            trainer = build_trl(policy, tokenizer, pairs, run, output_dir)
        else:
            trainer = build_sapo(policy, tokenizer, pairs, run, output_dir, SAPO_OPTIONS[config])
        del policy  # the trainers train copies
        trainer.remove_callback(PrinterCallback)
        timer = StepTimer(run.warmup)
        trainer.add_callback(timer)  # last, so SAPO's own step-end work falls inside the step
        result["built_peak_mib"] = harness.peak_mib()
        trainer.train()
    return {
        **result,
        "peak_mib": harness.peak_mib(),
        "steps_s": timer.steps,
        "cpu_steps_s": timer.cpu_steps,
        "generation_s": timer.generation_seconds,  # over the measured steps (sapo_total only)
        "generated_tokens": timer.generated_tokens,
        "torch_threads": torch.get_num_threads(),
    }


def time_scoring(policy, tokenizer, pairs, run, full_sums: bool) -> dict:
    """Forward and backward of the policy's packed scoring, batch by batch, after ``run.warmup``."""
    import torch

    from sapo.config import SAPOConfig
    from sapo.packing import pack_pairs, packed_completion_logps

    chunk_size = SAPOConfig(output_dir=tempfile.gettempdir()).logprob_chunk_size
    steps, cpu_steps = [], []
    for start in range(0, len(pairs), run.batch_size):
        batch = pack_pairs(
            pairs[start : start + run.batch_size], tokenizer.pad_token_id, score_shared_prefix=full_sums
        )
        wall, cpu = time.perf_counter(), time.process_time()
        logps, _ = packed_completion_logps(policy, batch, chunk_size=chunk_size)
        logps.sum().backward()
        steps.append(time.perf_counter() - wall)
        cpu_steps.append(time.process_time() - cpu)
        policy.zero_grad(set_to_none=True)
    warm = run.warmup
    return {
        "peak_mib": harness.peak_mib(),
        "steps_s": steps[warm:],
        "cpu_steps_s": cpu_steps[warm:],
        "built_peak_mib": 0.0,
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="vocabulary 4096, 32 + 32 tokens, 1 step")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS[1:], default=list(DEFAULT_CONFIGS))
    parser.add_argument("--vocab_size", type=int, default=151936)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--prompt_length", type=int, default=256)
    parser.add_argument("--completion_length", type=int, default=256)
    parser.add_argument(
        "--segment_length", type=int, default=128, help="tokens of the gold answer rewritten (default: half)"
    )
    parser.add_argument("--steps", type=int, help="measured steps per configuration (default: 3 TRL, 5 SAPO)")
    parser.add_argument("--warmup", type=int, default=1, help="steps skipped at the start of each run")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    settings = parser.parse_args(argv)
    if settings.quick:
        settings.vocab_size, settings.prompt_length, settings.completion_length = 4096, 32, 32
        settings.segment_length, settings.steps = 16, 1
    return settings


def main(argv=None) -> dict:
    options = parse_args(argv)
    load_before = harness.load_average()
    common = dict(
        vocab_size=options.vocab_size,
        model=dict(
            hidden_size=options.hidden_size, intermediate_size=4 * options.hidden_size,
            num_hidden_layers=options.layers, num_attention_heads=4,
        ),
        batch_size=options.batch_size, prompt_length=options.prompt_length,
        completion_length=options.completion_length, segment_length=options.segment_length,
        warmup=options.warmup,
    )  # fmt: skip

    def settings_for(config: str) -> dict:
        steps = options.steps or (3 if config == "trl_dpo" else 5)
        return {**common, "steps": steps}

    started = time.perf_counter()
    runs = {}
    for config in ["baseline", *options.configs]:
        print(f"measuring {config} ...", file=sys.stderr, flush=True)
        runs[config] = harness.run_fresh("benchmarks.large_vocab", config, settings_for(config))
    wall_s = time.perf_counter() - started

    baseline = runs["baseline"]["peak_mib"]
    trained = [config for config in runs if config != "baseline"]
    step_ms = {config: 1000 * statistics.median(runs[config]["steps_s"]) for config in trained}
    cpu_ms = {config: 1000 * statistics.median(runs[config]["cpu_steps_s"]) for config in trained}
    above = harness.above_baseline({config: run["peak_mib"] for config, run in runs.items()})
    measured_on = harness.machine(load_before, torch_threads=runs[trained[0]]["torch_threads"])

    def ratio(values: dict, config: str, baseline: str = "trl_dpo") -> float | None:
        both = config in values and baseline in values and values[baseline] > 0
        return round(values[config] / values[baseline], 4) if both else None

    first = runs["baseline"]
    print(
        f"Llama {first['parameters'] / 1e6:.1f}M parameters ({common['model']}, tied embeddings), vocabulary "
        f"{options.vocab_size}; batch {options.batch_size}, prompt {options.prompt_length} + answer "
        f"{options.completion_length}, segment {options.segment_length}; float32, AdamW"
    )
    print(harness.describe(measured_on))
    header = (
        "config",
        "step ms",
        "vs trl_dpo",
        "CPU ms",
        "CPU vs trl",
        "peak MiB",
        "above base",
        "vs trl_dpo",
    )
    print(f"{header[0]:<24}" + "".join(f"{name:>12}" for name in header[1:]))
    print(
        f"{'baseline':<24}" + "".join(f"{cell:>12}" for cell in ("", "", "", "", f"{baseline:.0f}", "", ""))
    )
    for config in trained:
        ratios = [ratio(values, config) for values in (step_ms, cpu_ms, above)]
        ratios = ["-" if value is None else f"{value:.3f}" for value in ratios]
        cells = (
            f"{step_ms[config]:.0f}", ratios[0], f"{cpu_ms[config]:.0f}", ratios[1],
            f"{runs[config]['peak_mib']:.0f}", f"{above[config]:.0f}", ratios[2],
        )  # fmt: skip
        print(f"{config:<24}" + "".join(f"{cell:>12}" for cell in cells))
    sapo_positions, trl_positions = (
        first["sapo_head_positions_per_pair"],
        first["trl_head_positions_per_pair"],
    )
    print(
        f"head positions per pair (policy forward): SAPO {sapo_positions:.1f}, TRL {trl_positions} "
        f"(ratio {sapo_positions / trl_positions:.3f}); measured steps: "
        + ", ".join(f"{config} {len(runs[config]['steps_s'])}" for config in trained)
    )
    # what leaving the shared prefix out of the DPO sums saves, on the policy's scoring alone
    prefix_left_out = {
        "time": ratio(step_ms, "scoring", "scoring_full_sums"),
        "cpu": ratio(cpu_ms, "scoring", "scoring_full_sums"),
        "memory": ratio(above, "scoring", "scoring_full_sums"),
    }
    if prefix_left_out["time"] is not None:
        print(f"scoring without / with the shared prefix: {prefix_left_out}")
    generating = [config for config in trained if SAPO_OPTIONS.get(config, {}).get("generate")]
    generation = {config: generation_rates(runs[config]) for config in generating}
    for config, rates in generation.items():
        print(
            f"{config}: generation {rates['generation_s_per_step']:.2f} s per step, "
            f"{rates['generation_tokens_per_s']:.1f} segment tokens/s"
        )
    summary = {
        "benchmark": "large_vocab",
        "update_vs_trl_dpo": ratio(step_ms, "sapo_update"),
        "peak_memory_vs_trl_dpo": ratio(above, "sapo_update"),
        "update_cpu_vs_trl_dpo": ratio(cpu_ms, "sapo_update"),
        "total_vs_trl_dpo": ratio(step_ms, "sapo_total"),
        **generation.get("sapo_total", generation_rates(None)),
        "vocab_size": options.vocab_size,
        **{
            f"{config}_vs_trl_dpo": ratio(step_ms, config) for config in trained if config.startswith("sapo_")
        },
        **{
            f"{config}_peak_memory_vs_trl_dpo": ratio(above, config)
            for config in trained
            if config.startswith("sapo_")
        },
        "generation": generation,
        "shared_prefix_left_out_vs_scored": prefix_left_out if prefix_left_out["time"] is not None else None,
        "median_step_ms": {config: round(value, 1) for config, value in step_ms.items()},
        "median_step_cpu_ms": {config: round(value, 1) for config, value in cpu_ms.items()},
        "peak_mib": {config: round(run["peak_mib"], 1) for config, run in runs.items()},
        "above_baseline_mib": {config: round(value, 1) for config, value in above.items()},
        "built_peak_mib": {config: round(runs[config]["built_peak_mib"], 1) for config in trained},
        "steps_s": {config: [round(s, 3) for s in runs[config]["steps_s"]] for config in trained},
        "head_positions_per_pair": {"sapo": round(sapo_positions, 1), "trl_dpo_cpu": trl_positions},
        "model_parameters": first["parameters"],
        "settings": {**common, "quick": options.quick, "configs": options.configs},
        "wall_s": round(wall_s, 1),
        "machine": measured_on,
    }
    print(json.dumps(summary))
    return summary


def generation_rates(run: dict | None) -> dict:
    """Generation seconds per measured step and segment tokens per second of generation."""
    if not run or not run["steps_s"] or not run.get("generation_s"):
        return {"generation_s_per_step": None, "generation_tokens_per_s": None}
    return {
        "generation_s_per_step": round(run["generation_s"] / len(run["steps_s"]), 3),
        "generation_tokens_per_s": round(run["generated_tokens"] / run["generation_s"], 1),
    }


if __name__ == "__main__" and not harness.serve_worker(run_worker):
    main()
