"""Run by test_ownership.py under `torchrun --nproc_per_node 2` (CPU, gloo).

    torchrun --nproc_per_node 2 tests/checkpoints/ownership_worker.py OUT

Three runs on one folder, each on both processes: a 2-step run that saves checkpoint-2 and its
model and, at its first step, records the lock file as each rank sees it and asks a process
outside the run whether the folder is free; a new run (another seed, no resume) on the finished
folder, which every rank must refuse; the first run resumed for a third step. Rank 0 writes
`ownership.json` beside the folder.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import datasets
import torch.distributed as dist
import transformers
from datasets import Dataset
from transformers import TrainerCallback

from sapo import SAPOConfig, SAPOTrainer
from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.checkpoints import LOCK_FILE, OutputDirError

PROBE = "from sapo.checkpoints import check_output_dir; import sys; check_output_dir(sys.argv[1])"


class AtFirstStep(TrainerCallback):
    """The lock file as this rank sees it and, on rank 0, an outside process's look at the folder."""

    def __init__(self, output_dir):
        self.output_dir, self.seen = output_dir, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != 1:
            return
        self.seen["lock"] = json.loads(Path(self.output_dir, LOCK_FILE).read_text())
        if args.process_index == 0:
            probe = subprocess.run(
                [sys.executable, "-c", PROBE, self.output_dir], capture_output=True, text=True, timeout=300
            )
            self.seen["outside"] = probe.stderr.strip().splitlines()[-1]


def trainer(output_dir, rows, tokenizer, **overrides):
    settings = dict(
        output_dir=output_dir, max_steps=2, per_device_train_batch_size=4, segment_length=4,
        learning_rate=1e-3, save_strategy="steps", save_steps=2, logging_steps=100, report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    settings.update(overrides)
    return SAPOTrainer(
        model=tiny_llama(tokenizer, seed=0),
        args=SAPOConfig(**settings),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


transformers.logging.set_verbosity_error()
datasets.disable_progress_bars()
output_dir = sys.argv[1]
rng = random.Random(0)
rows = [
    {"prompt": f"{a}+{b}=", "completion": str(a + b)}
    for a, b in ((rng.randint(10, 99), 11) for _ in range(32))
]
tokenizer = char_tokenizer()

first = trainer(output_dir, rows, tokenizer)
at_first_step = AtFirstStep(output_dir)
first.add_callback(at_first_step)
first.train()
first.save_model(output_dir)

refusal = None
try:
    trainer(output_dir, rows, tokenizer, seed=7).train()
except OutputDirError as error:
    refusal = str(error)

resumed = trainer(output_dir, rows, tokenizer, max_steps=3)
resumed.train(resume_from_checkpoint="last")

gathered = [None] * dist.get_world_size()
report = {
    "pid": os.getpid(),
    **at_first_step.seen,
    "refusal": refusal,
    "resumed_to": resumed.state.global_step,
}
dist.all_gather_object(gathered, report)
if dist.get_rank() == 0:
    lock_left = Path(output_dir, LOCK_FILE).exists()
    Path(output_dir).with_name("ownership.json").write_text(
        json.dumps({"ranks": gathered, "lock_left": lock_left})
    )
