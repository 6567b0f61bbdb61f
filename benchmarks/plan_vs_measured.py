"""``sapo plan``'s per-device peak against the peak measured while SAPO trains, on the CPU.

Each setup trains SAPO for a few steps in fresh processes (one, or two under torchrun with gloo
and DeepSpeed's CPU accelerator) and records each process's peak resident memory in each interval
of a step (before sampling, sampling, reference and training pass, optimizer step and EMA) from
the kernel's high-water mark, restarted when training begins and at each mark
(``harness.PeakLog``): building the model is not what the plan counts. Its baseline runs the
same code, launch and data on a model too small to count (0.03M parameters) for one step; its
resident memory at the end (interpreter, libraries, what they load lazily, data) is subtracted.
The plan is computed for the same model, batch and lengths with ``sapo.planning``
(``device="cpu"``: no CUDA context, CPU optimizer kernels).

Setups: full fine-tuning and LoRA, on one process and on 2 processes under DeepSpeed ZeRO-3 (the
policy partitioned at construction, as the recipes' ``zero3_init_flag: true`` loads it), all in
float32 (bfloat16 kernels are slow on CPUs); the 2-process figure is the larger rank's. Workers
run with ``MALLOC_MMAP_THRESHOLD_=65536`` (:mod:`benchmarks.harness`) and one thread.

Usage::

    python -m benchmarks.plan_vs_measured                    # every setup, ~24M-parameter model
    python -m benchmarks.plan_vs_measured --setups single-full,zero3-full

The last line printed is one JSON object: each setup's measured and planned MiB, their ratio,
and whether every ratio is within ±25%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if not __package__:  # started as a file: run as the module (benchmarks/__init__.py)
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.plan_vs_measured", *sys.argv[1:]])

from benchmarks import harness

SETUPS = {
    # name: (processes, LoRA, ZeRO-3, gradient checkpointing)
    "single-full": (1, False, False, False),
    "single-full-checkpointing": (1, False, False, True),
    "single-lora": (1, True, False, False),
    "zero3-full": (2, False, True, False),
    "zero3-lora": (2, True, True, False),
}
SETTINGS = dict(
    model=dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
    ),
    pairs=4,
    prompt_tokens=64,
    answer_tokens=64,  # with EOS; the segment rewrites the whole answer, so pairs are the widest
    steps=3,
    lora_r=16,
    learning_rate=1e-4,
    seed=0,
)
# the baseline's model: the same code paths, memory too small to count (0.03M parameters)
BASELINE_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=128)  # fmt: skip
TOLERANCE = 0.25
BUILT = "model built"  # the interval up to train begin, which the plan does not count


# ---------------------------------------------------------------------------------------------
# worker: one setup (or its baseline) in fresh processes
# ---------------------------------------------------------------------------------------------


def sapo_config(settings: dict, output_dir: str, zero3: bool, checkpointing: bool):
    from sapo import SAPOConfig
    from sapo.builtin.settings import tiny_run_args

    deepspeed = None
    if zero3:  # what recipes/accelerate/zero3.yaml gives: DeepSpeed's defaults otherwise
        deepspeed = {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": "auto"},
        }
    length = settings["prompt_tokens"] + settings["answer_tokens"]
    return SAPOConfig(
        **tiny_run_args(
            output_dir,
            settings["steps"],
            settings["pairs"],
            settings["learning_rate"],
            settings["seed"],
            optim="adamw_torch",
            logging_steps=settings["steps"],
            gradient_checkpointing=checkpointing,
        ),  # fmt: skip
        loss_type="dpo",
        segment_length=settings["answer_tokens"],
        max_length=length,
        max_prompt_length=settings["prompt_tokens"],
        replay_buffer_size=64,
        deepspeed=deepspeed,
    )


def worker(name: str, settings: dict) -> dict | None:
    """Train one setup (``baseline-<setup>``: the same on a model too small to count, one step)
    and return its peak resident memory per interval of the run; rank 0 returns the fuller
    rank's, the other ranks ``None``."""
    import tempfile

    import torch
    import torch.distributed as dist
    from datasets import Dataset

    torch.set_num_threads(1)
    from transformers import LlamaForCausalLM, TrainerCallback

    from benchmarks.memory_worker import build_rows
    from sapo import SAPOTrainer
    from sapo.builtin.tiny import char_tokenizer, tiny_llama
    from sapo.data import prepare_dataset

    _, lora, zero3, checkpointing = SETUPS[name.removeprefix("baseline-")]
    if name.startswith("baseline-"):
        settings = {**settings, "model": BASELINE_MODEL, "steps": 1}
    tokenizer = char_tokenizer()
    rows, _ = build_rows(
        64, settings["prompt_tokens"], settings["answer_tokens"] - 1, 0, settings["answer_tokens"]
    )
    length = settings["prompt_tokens"] + settings["answer_tokens"]
    dataset = prepare_dataset(Dataset.from_list(rows), tokenizer, length, settings["prompt_tokens"])
    peaks = harness.PeakLog(per_interval=True)
    mark = peaks.mark

    class Marks(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            mark(BUILT)

        def on_pre_optimizer_step(self, *args, **kwargs):
            mark("reference and training pass")

        def on_step_end(self, *args, **kwargs):
            mark("optimizer step, EMA")

    class MarkedSAPOTrainer(SAPOTrainer):
        def generate_pairs(self, rows, step):  # instrumentation only: the peak of sampling
            mark("before sampling")
            super().generate_pairs(rows, step)
            mark("sampling")

    with tempfile.TemporaryDirectory() as output_dir:
        args = sapo_config(settings, output_dir, zero3, checkpointing)
        with torch.device("meta"):  # the architecture only
            config = tiny_llama(tokenizer, size="small", **settings["model"]).config
        torch.manual_seed(settings["seed"])
        model = LlamaForCausalLM._from_config(config)  # under a ZeRO-3 config: partitioned (zero.Init)
        peft_config = None
        if lora:
            from peft import LoraConfig

            peft_config = LoraConfig(r=settings["lora_r"], lora_alpha=2 * settings["lora_r"],
                                     target_modules="all-linear", lora_dropout=0.0)  # fmt: skip
        trainer = MarkedSAPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
        )
        trainer.add_callback(Marks())
        trainer.train()
        mark("end")
    training = [entry for entry in peaks.marks if entry["phase"] != BUILT]
    peak = max(training, key=lambda entry: entry["interval_peak_mib"])
    record = {
        "prompt_tokens": max(map(len, dataset["prompt_ids"])),
        "answer_tokens": max(map(len, dataset["gold_ids"])),
        "peak_mib": peak["interval_peak_mib"],
        "peak_phase": peak["phase"],
        "resident_mib": harness.resident_mib(),
        "marks": training,
    }
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, record)
        if dist.get_rank() != 0:
            return None
        record = max(gathered, key=lambda rank: rank["peak_mib"])  # the fuller rank
    return record


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def run(name: str, processes: int, settings: dict) -> dict:
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return harness.run_fresh("benchmarks.plan_vs_measured", name, settings, processes=processes, env=env)


def planned_mib(name: str, settings: dict, lengths: dict) -> tuple[float, str]:
    import tempfile

    from sapo.builtin.tiny import char_tokenizer, tiny_llama
    from sapo.planning import GIB, Setup, model_shape, plan_memory

    processes, lora, zero3, checkpointing = SETUPS[name]
    tokenizer = char_tokenizer()
    length = lengths["prompt_tokens"] + lengths["answer_tokens"]
    shape = model_shape(tiny_llama(tokenizer, size="small", **settings["model"]).config, max_length=length)
    with tempfile.TemporaryDirectory() as output_dir:
        args = sapo_config(settings, output_dir, False, checkpointing)
    setup = Setup.of_run(
        args, shape, distributed="zero3" if zero3 else "single", num_devices=processes, weight_bytes=4,
        lora_rank=settings["lora_r"] if lora else None, lora_targets="all-linear" if lora else None,
        sequence_tokens=length, answer_tokens=lengths["answer_tokens"], device="cpu",
    )  # fmt: skip
    plan = plan_memory(shape, setup)
    return plan.peak / GIB * 1024, plan.peak_phase


def phase_peaks(marks: list[dict], baseline_mib: float) -> dict[str, float]:
    """The largest peak above the baseline in each kind of interval of a run, MiB."""
    peaks: dict[str, float] = {}
    for entry in marks:
        value = round(entry["interval_peak_mib"] - baseline_mib, 1)
        peaks[entry["phase"]] = max(value, peaks.get(entry["phase"], value))
    return peaks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--setups", default=",".join(SETUPS), help="comma-separated subset of " + ",".join(SETUPS)
    )
    options = parser.parse_args(argv)
    names = [name for name in options.setups.split(",") if name]
    unknown = sorted(set(names) - set(SETUPS))
    if unknown:
        parser.error(f"--setups: unknown {unknown}; choose from {list(SETUPS)}")
    baselines: dict[str, dict] = {}
    results = {}
    print(f"{'setup':<28} {'measured MiB':>13} {'planned MiB':>12} {'plan/measured':>14}  planned peak phase")
    for name in names:
        processes = SETUPS[name][0]
        print(f"measuring {name} and its baseline ...", file=sys.stderr, flush=True)
        baselines[name] = run(f"baseline-{name}", processes, SETTINGS)
        measured = run(name, processes, SETTINGS)
        base = baselines[name]["resident_mib"]
        above = measured["peak_mib"] - base
        planned, phase = planned_mib(name, SETTINGS, measured)
        results[name] = {"measured_mib": round(above, 1), "planned_mib": round(planned, 1),
                         "ratio": round(planned / above, 3), "planned_peak_phase": phase,
                         "measured_peak_phase": measured["peak_phase"],
                         "measured_mib_by_phase": phase_peaks(measured["marks"], base)}  # fmt: skip
        print(f"{name:<28} {above:>13.1f} {planned:>12.1f} {planned / above:>14.3f}  {phase}", flush=True)
    within = all(abs(result["ratio"] - 1) <= TOLERANCE for result in results.values())
    print(f"every plan within ±{TOLERANCE:.0%} of the measured peak: {'yes' if within else 'NO'}")
    summary = {
        "benchmark": "plan_vs_measured",
        "metric": "peak resident MiB per process during training, above a baseline process; the plan's peak",
        "setups": results,
        "within_25_percent": within,
        "settings": SETTINGS,
        "baseline_resident_mib": {name: round(v["resident_mib"], 1) for name, v in baselines.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__" and not harness.serve_worker(worker):
    main()
