"""Run by tests/checkpoints/test_preemption.py under `torchrun --nproc_per_node 2` (CPU, gloo).

    torchrun --nproc_per_node 2 preemption_worker.py OUT

SAPO-DPO on two processes inside ``stop_on_signals``; at the end of step 2 rank 1 alone sends
itself SIGTERM. Each rank writes ``OUT/rank{r}.json``: the step it stopped after, its exit code
and the step it reached; then exits with that code.
"""

import json
import os
import signal
import sys
from pathlib import Path

import datasets
import transformers
from datasets import Dataset
from transformers import TrainerCallback

from sapo import SAPOConfig, SAPOTrainer
from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.checkpoints import stop_on_signals

transformers.logging.set_verbosity_error()
datasets.disable_progress_bars()
output_dir = sys.argv[1]
tokenizer = char_tokenizer()
rows = [{"prompt": f"{a}+{a + 3}=", "completion": str(2 * a + 3)} for a in range(10, 42)]
args = SAPOConfig(
    output_dir=output_dir, max_steps=6, per_device_train_batch_size=2, segment_length=2,
    max_length=32, replay_buffer_size=8, save_strategy="no", logging_steps=100, report_to="none",
    use_cpu=True, disable_tqdm=True, seed=0,
)  # fmt: skip
trainer = SAPOTrainer(
    model=tiny_llama(tokenizer, seed=0), args=args, train_dataset=Dataset.from_list(rows),
    processing_class=tokenizer,
)  # fmt: skip


class SignalRankOne(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if args.process_index == 1 and state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


trainer.add_callback(SignalRankOne())
with stop_on_signals(trainer) as stop:
    trainer.train()
report = {
    "stopped_at": stop.stopped_at,
    "exit_code": stop.exit_code,
    "global_step": trainer.state.global_step,
}
Path(output_dir, f"rank{args.process_index}.json").write_text(json.dumps(report))
sys.exit(stop.exit_code)
