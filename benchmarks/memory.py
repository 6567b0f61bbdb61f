"""Peak memory of SAPO-DPO against TRL's ``DPOTrainer``, with LoRA and with full fine-tuning.

Configurations, each measured in its own fresh Python process so that peaks do not mix:

- ``baseline``: imports the same libraries and builds the same model and data, but does not train;
- ``lora_dpo``: TRL ``DPOTrainer`` with ``peft_config`` and no ``ref_model`` (the reference is the
  base model with the adapter disabled);
- ``lora_sapo``: ``SAPOTrainer`` with the same ``peft_config`` (policy, EMA and reference are three
  adapters on one base);
- ``full_dpo``: TRL ``DPOTrainer`` with an explicit ``ref_model`` (a second copy of the model);
- ``full_sapo``: ``SAPOTrainer`` without PEFT (a reference copy and a float32 EMA copy);
- ``lora_sapo_padded``, ``full_sapo_padded``: the same SAPO runs scoring chosen and rejected as
  two padded rows, as SAPO does when the attention implementation cannot take its packed 4D mask
  (flash attention); by default SAPO packs a pair into one row that holds the shared prefix once.

All runs share the model, the batch, the optimizer (``adamw_torch``), the learning rate, the LoRA
config, ``bf16=False`` and ``gradient_checkpointing=False``, on CPU. The memory figure is the
process's peak resident memory (:mod:`benchmarks.harness`). The baseline's peak is subtracted
from each run's peak, so that the "above baseline" figure counts the training state (gradients,
optimizer state, activations, reference/EMA copies, generation) rather than the interpreter, the
libraries and the policy weights. The ratios are computed on the above-baseline figures.

Each worker also records its peak at a few points of the run (trainer built, training started,
after each step; for SAPO also before and after each generation call), which shows where the
extra memory appears.

Workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` (:mod:`benchmarks.harness` says why;
``--malloc_default`` measures with glibc's default). Workers use one torch thread by default: on
busy shared cores, two spinning OpenMP threads slowed the small kernels of generation 6-20x;
memory does not depend on it.

Usage::

    python -m benchmarks.memory                      # ~49M-parameter model, batch 4, 3 steps
    python -m benchmarks.memory --quick              # ~3M-parameter model, for a fast check
    python -m benchmarks.memory --batch_size 8       # more activations per step
    python -m benchmarks.memory --vocab_size 32000 --configs lora_dpo,lora_sapo,lora_sapo_padded
                                                     # a real vocabulary: the cost of the LM head

The last line printed is one JSON object with the ratios, the peaks and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

if not __package__:  # started as a file: run as the module (benchmarks/__init__.py)
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.memory", *sys.argv[1:]])

from benchmarks import harness

CONFIGS = (
    "baseline",
    "lora_dpo",
    "lora_sapo",
    "lora_sapo_padded",
    "full_dpo",
    "full_sapo",
    "full_sapo_padded",
)

MODEL_PRESETS = {
    # ~49M parameters: weights, gradients and Adam state dominate full fine-tuning
    "default": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12),
    # ~2.9M parameters: a fast check of the whole pipeline
    "quick": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
}


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator > 0 else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~3M-parameter model, batch 4, 2 steps")
    parser.add_argument("--batch_size", type=int, help="per-device batch of pairs (default 4)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 3; 2 with --quick)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per configuration; the median peak is used"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker (default 1: on busy shared cores, spinning OpenMP threads slowed "
        "generation 6-20x; 0 keeps torch's default)",
    )
    parser.add_argument(
        "--malloc_default",
        action="store_true",
        help="leave glibc's allocator as it is (default: MALLOC_MMAP_THRESHOLD_=65536 in the workers, so "
        "that the peak follows live memory; the default allocator adds run-to-run noise of tens of MiB)",
    )
    parser.add_argument(
        "--vocab_size",
        type=int,
        default=0,
        help="output vocabulary of the model (default 0: the char tokenizer's 102 tokens); a real "
        "vocabulary (e.g. 32000) shows the cost of materialised logits",
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS)
    )
    options = parser.parse_args(argv)

    configs = [name.strip() for name in options.configs.split(",") if name.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    if "baseline" not in configs:
        configs.insert(0, "baseline")
    steps = options.steps or (2 if options.quick else 3)
    batch_size = options.batch_size or 4
    settings = dict(
        model=MODEL_PRESETS["quick" if options.quick else "default"],
        batch_size=batch_size,
        steps=steps,
        prompt_tokens=64,
        answer_tokens=64,  # including EOS
        length_jitter=1,  # an answer is 63 or 64 tokens
        segment_length=32,
        max_length=256,
        learning_rate=1e-4,
        lora_r=16,
        ref_model_sync_steps=2,  # so that a reference sync happens inside the measured steps
        rows=max(64, 2 * batch_size * steps),
        seed=0,
        threads=options.threads,
        vocab_size=options.vocab_size or None,
        malloc_mmap_threshold=None if options.malloc_default else harness.MALLOC_MMAP_THRESHOLD,
    )

    load_before = harness.load_average()
    code_before = harness.code_version()
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for repeat in range(options.repeats):
        for name in configs:  # round-robin, so that drift in the machine's state hits all alike
            print(f"[{repeat + 1}/{options.repeats}] measuring {name} ...", file=sys.stderr, flush=True)
            allocator = settings["malloc_mmap_threshold"]
            run = harness.run_fresh(
                "benchmarks.memory_worker", name, settings, malloc_mmap_threshold=allocator
            )
            runs[name].append(run)
    measured_on = harness.machine(load_before, torch_threads=settings["threads"] or None)

    raw = {name: statistics.median(run["peak_mib"] for run in results) for name, results in runs.items()}
    spread = {
        name: round(max(r["peak_mib"] for r in results) - min(r["peak_mib"] for r in results), 1)
        for name, results in runs.items()
    }
    above = harness.above_baseline(raw)
    first = {name: results[0] for name, results in runs.items()}
    params = first["baseline"]["parameters"]
    model_copy_mib = params * 4 / 2**20
    parts = {name: breakdown(first[name]["phases"]) for name in configs if name != "baseline"}

    print(f"model: {params / 1e6:.1f}M parameters {settings['model']}")
    print(f"one float32 copy of the model = {model_copy_mib:.1f} MiB")
    print(
        f"batch {batch_size} pairs, prompt {settings['prompt_tokens']} + answer {settings['answer_tokens']} "
        f"tokens (answers up to {settings['length_jitter']} fewer), SAPO segment_length "
        f"{settings['segment_length']}, {steps} steps, adamw_torch, "
        f"lr {settings['learning_rate']}, LoRA r={settings['lora_r']} on q/k/v/o, float32, CPU, "
        f"{settings['threads'] or 'default'} thread(s); {options.repeats} run(s) per configuration (median)"
    )
    print()
    header = (
        f"{'configuration':<17} {'peak RSS MiB':>13} {'above baseline MiB':>19} {'at init':>8} "
        f"{'generation':>10} {'in steps':>9} {'trainable':>11} {'wall s':>7}"
    )
    print(header)
    print("-" * len(header))
    for name in configs:
        run = first[name]
        cells = (
            ["", "", "", ""]
            if name == "baseline"
            else [
                f"{above[name]:.1f}",
                f"{parts[name]['init_mib']:.1f}",
                "-" if parts[name]["generation_mib"] is None else f"{parts[name]['generation_mib']:.1f}",
                f"{parts[name]['steps_mib']:.1f}",
            ]
        )
        print(
            f"{name:<17} {raw[name]:>13.1f} {cells[0]:>19} {cells[1]:>8} {cells[2]:>10} {cells[3]:>9} "
            f"{run['trainable_parameters']:>11,} {statistics.median(r['wall_s'] for r in runs[name]):>7.1f}"
        )
    print(
        "  at init: rise of the peak while the trainer is built (reference/EMA copies, adapters); "
        "generation: rise during the first SAPO generation call; in steps: rise from the start of "
        "training to the end (gradients, optimizer state, activations)"
    )
    if options.repeats > 1:
        print(
            "  spread of the peak over repeats (max - min, MiB): "
            + ", ".join(f"{n} {v}" for n, v in spread.items())
        )
    print()
    ratios = {}
    for mode in ("lora", "full"):
        dpo = f"{mode}_dpo"
        for sapo in (f"{mode}_sapo", f"{mode}_sapo_padded"):
            if sapo in above and dpo in above:
                key = f"{sapo}_vs_{dpo}"
                ratios[key] = ratio(above[sapo], above[dpo])
                ratios[f"{key}_raw"] = ratio(raw[sapo], raw[dpo])
                print(
                    f"{sapo + ' / ' + dpo:<30} {ratios[key]!s:>6} above baseline (raw peaks: "
                    f"{ratios[f'{key}_raw']}); difference {raw[sapo] - raw[dpo]:+.1f} MiB"
                )
    if ratios.get("lora_sapo_vs_lora_dpo") is not None:
        goal = ratios["lora_sapo_vs_lora_dpo"] <= 1.15
        print(f"goal LoRA SAPO <= 1.15x LoRA DPO (above baseline): {'met' if goal else 'NOT met'}")
        if ratios.get("lora_sapo_padded_vs_lora_dpo") is not None:
            goal = ratios["lora_sapo_padded_vs_lora_dpo"] <= 1.15
            print(f"  ... and with padded scoring (flash-attention path): {'met' if goal else 'NOT met'}")
    print()
    print("peak RSS (MiB) at points of each run (first repeat):")
    for name in configs:
        marks = ", ".join(f"{mark['phase']} {mark['peak_mib']:.0f}" for mark in first[name]["phases"])
        print(f"  {name}: {marks}")
    print(harness.describe(measured_on))
    if measured_on["code"]["source_sha256"] != code_before["source_sha256"]:
        print(f"WARNING: sapo's source changed during the runs (was {code_before}); measure again")

    summary = {
        "benchmark": "memory",
        "metric": "peak resident memory (VmHWM) per fresh process, MiB; ratios on above-baseline figures",
        "lora_sapo_vs_lora_dpo": ratios.get("lora_sapo_vs_lora_dpo"),
        "full_sapo_vs_full_dpo": ratios.get("full_sapo_vs_full_dpo"),
        "lora_sapo_padded_vs_lora_dpo": ratios.get("lora_sapo_padded_vs_lora_dpo"),
        "full_sapo_padded_vs_full_dpo": ratios.get("full_sapo_padded_vs_full_dpo"),
        "raw_peak_ratios": {
            key[: -len("_raw")]: value for key, value in ratios.items() if key.endswith("_raw")
        },
        "lora_goal_1_15_met": (
            None if ratios.get("lora_sapo_vs_lora_dpo") is None else ratios["lora_sapo_vs_lora_dpo"] <= 1.15
        ),
        "peak_mib": {name: round(value, 1) for name, value in raw.items()},
        "above_baseline_mib": {name: round(value, 1) for name, value in above.items()},
        "breakdown_mib": parts,
        "peak_spread_mib": spread,
        "parameters": params,
        "model_copy_fp32_mib": round(model_copy_mib, 1),
        "trainable_parameters": {name: first[name]["trainable_parameters"] for name in configs},
        "sapo_scoring": {
            name: first[name]["sapo_scoring"] for name in configs if first[name].get("sapo_scoring")
        },
        "code_before": code_before,
        "wall_s": {name: round(statistics.median(r["wall_s"] for r in runs[name]), 1) for name in configs},
        "settings": {**settings, "repeats": options.repeats, "quick": options.quick},
        "machine": measured_on,
    }
    print(json.dumps(summary))


def breakdown(marks: list[dict]) -> dict:
    """Where a run's peak rose: building the trainer, the first generation call, the steps."""
    peak = {mark["phase"]: mark["peak_mib"] for mark in marks}
    generation = None
    if "step_1_before_generation" in peak and "step_1_after_generation" in peak:
        generation = round(peak["step_1_after_generation"] - peak["step_1_before_generation"], 1)
    return {
        "init_mib": round(peak["trainer_built"] - peak["model_and_data"], 1),
        "generation_mib": generation,
        "steps_mib": round(peak["end"] - peak["train_begin"], 1),
    }


if __name__ == "__main__":
    main()
