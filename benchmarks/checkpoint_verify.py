"""What verified checkpoints cost: recording every file's SHA-256 next to writing the checkpoint.

Trains a ~50M-parameter Llama (float32, SAPO-DPO, AdamW) for one step that saves a checkpoint,
and times, through public hooks only:

- ``write_seconds``: the whole checkpoint write, from the step's end (``on_step_end``) to the
  published folder (``on_save``): Trainer's weights, optimizer, scheduler and RNG state, SAPO's
  EMA, reference and replay buffer, and the checksums recorded in ``sapo_run.json``;
- ``checksum_seconds``: the median over ``--repeats`` of ``sapo.checkpoints.verify.file_records``
  on that folder, the same reads and hashing that :func:`sapo.checkpoints.inspect` does when a run
  resumes (the files are in the page cache, as right after a write).

    python -m benchmarks.checkpoint_verify

Last line: one JSON object with ``parameters``, ``checkpoint_bytes``, ``write_seconds``,
``checksum_seconds``, ``checksum_share_of_write``, ``checksum_gb_per_second`` and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # started as a file: run as the module (benchmarks/__init__.py)
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.checkpoint_verify", *sys.argv[1:]])

from datasets import Dataset
from transformers import TrainerCallback

from benchmarks import harness
from sapo import SAPOConfig, SAPOTrainer
from sapo.builtin.settings import tiny_run_args
from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.checkpoints.verify import file_records


class SaveTimer(TrainerCallback):
    def __init__(self):
        self.started = self.seconds = None

    def on_step_end(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.started


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden_size", type=int, default=640)
    parser.add_argument("--intermediate_size", type=int, default=1728)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load_before = harness.load_average()

    tokenizer = char_tokenizer()
    model = tiny_llama(
        tokenizer, seed=0, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=10, num_key_value_heads=2,
    )  # fmt: skip
    parameters = sum(p.numel() for p in model.parameters())
    rows = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(10, 42)]
    with tempfile.TemporaryDirectory() as output:
        settings = tiny_run_args(
            output, steps=1, batch_size=2, learning_rate=1e-5, save_strategy="steps", save_steps=1,
            segment_length=2, max_length=32, replay_buffer_size=8,
        )  # fmt: skip
        config = SAPOConfig(**settings)
        timer = SaveTimer()
        trainer = SAPOTrainer(
            model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
            callbacks=[timer],
        )  # fmt: skip
        trainer.train()
        folder = Path(output) / "checkpoint-1"
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        timings = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            file_records(folder)
            timings.append(time.perf_counter() - started)
    checksum = statistics.median(timings)
    result = {
        "parameters": parameters,
        "checkpoint_bytes": size,
        "write_seconds": round(timer.seconds, 3),
        "checksum_seconds": round(checksum, 3),
        "checksum_share_of_write": round(checksum / timer.seconds, 3),
        "checksum_gb_per_second": round(size / checksum / 1e9, 2),
        "machine": harness.machine(load_before),
    }
    print(f"{parameters / 1e6:.1f}M parameters, checkpoint {size / 1e6:.0f} MB")
    print(harness.describe(result["machine"]))
    print(f"write (checksums included): {timer.seconds:.2f} s; checksums alone: {checksum:.2f} s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
