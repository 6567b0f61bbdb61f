"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo).

    torchrun --nproc_per_node 2 tests/distributed_train.py OUT STEPS [RESUME] [OPTIONS]

OPTIONS: `--lora` (a LoRA policy), `--zero 2|3` (DeepSpeed ZeRO, its CPU accelerator),
`--zero-init` (the policy built partitioned, as `from_pretrained` does under ZeRO-3), `--fsdp2`
(FSDP2 through Trainer + accelerate), `--bf16` (bfloat16 and gradient checkpointing).

Trains SAPO-DPO on an addition task, saves checkpoints every 2 steps and, on rank 0, writes
`report.json`: each rank's generation calls (rows per call), the logged metric names, a hash of
the final (whole) weights, SAPO's EMA and reference classes and the EMA's dtype.
"""

import hashlib
import json
import random
import sys
from pathlib import Path

import datasets
import deepspeed
import torch
import torch.distributed as dist
import transformers
from datasets import Dataset
from fsdp_on_cpu import allow_fsdp_on_cpu
from peft import LoraConfig
from torch.distributed.tensor import DTensor

from sapo import SAPOConfig, SAPOTrainer
from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.copies.zero3 import is_partitioned

transformers.logging.set_verbosity_error()
datasets.disable_progress_bars()
output_dir, max_steps = sys.argv[1], int(sys.argv[2])
resume = sys.argv[3] if len(sys.argv) > 3 and not sys.argv[3].startswith("--") else None
use_lora = "--lora" in sys.argv
zero_stage = int(sys.argv[sys.argv.index("--zero") + 1]) if "--zero" in sys.argv else None
deepspeed_config = None
fsdp_config = None
if "--fsdp2" in sys.argv:
    fsdp_config = {
        "fsdp_version": 2,
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "reshard_after_forward": True,
        "state_dict_type": "SHARDED_STATE_DICT",
    }
    allow_fsdp_on_cpu()
if zero_stage is not None:
    deepspeed_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": "auto"},  # as real configs have it: Trainer fills in --bf16
    }

rng = random.Random(0)
rows = []
for _ in range(64):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
tokenizer = char_tokenizer()
args = SAPOConfig(
    output_dir=output_dir,
    max_steps=max_steps,
    per_device_train_batch_size=4,
    segment_length=4,
    learning_rate=1e-3,
    ref_model_sync_steps=2,
    save_strategy="steps",
    save_steps=2,
    logging_steps=1,
    report_to="none",
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
    deepspeed=deepspeed_config,
    fsdp=fsdp_config is not None,
    bf16="--bf16" in sys.argv,
    gradient_checkpointing="--bf16" in sys.argv,
    fsdp_config=fsdp_config,
)
model = tiny_llama(tokenizer, seed=0)
if "--zero-init" in sys.argv:  # partitioned at construction, as from_pretrained after the config is
    torch.manual_seed(0)
    model = type(model)._from_config(model.config)
partitioned_at_start = is_partitioned(model)
trainer = SAPOTrainer(
    model=model,
    args=args,
    train_dataset=Dataset.from_list(rows),
    processing_class=tokenizer,
    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if use_lora else None,
)
calls = []
generate = trainer.sampler.generate
trainer.sampler.generate = lambda model, prefixes, limits, **options: (
    calls.append(len(prefixes)) or generate(model, prefixes, limits, **options)
)
trainer.train(resume_from_checkpoint=resume)
trainer.save_model(str(Path(output_dir) / "final"))

digest = hashlib.sha256()
policy = trainer.accelerator.unwrap_model(trainer.model)
for param in policy.parameters():
    with deepspeed.zero.GatheredParameters([param], enabled=zero_stage == 3):
        whole = param.full_tensor() if isinstance(param, DTensor) else param  # FSDP2
        digest.update(whole.detach().float().cpu().numpy().tobytes())
with trainer.ema.sampling_model() as sampling_model:  # every rank: the weights may be gathered
    sampling_dtype = str(next(sampling_model.parameters()).dtype)
gathered = [None] * dist.get_world_size()
dist.all_gather_object(
    gathered,
    {
        "calls": calls,
        "weights": digest.hexdigest(),
        "buffer": len(trainer.buffer),
        "copies": [type(trainer.ema).__name__, type(trainer.reference).__name__],
        "distributed_copies": [
            getattr(state, "sharded", False) for state in (trainer.ema, trainer.reference)
        ],
        "partitioned_at_start": partitioned_at_start,
        "ema_dtype": str(next(iter(trainer.ema.tensors().values())).dtype),
        "sampling_dtype": sampling_dtype,
        "first_margin": next(
            (entry["rewards/margins"] for entry in trainer.state.log_history if "rewards/margins" in entry),
            None,
        ),
    },
)
if trainer.args.process_index == 0:
    names = sorted(set().union(*(entry.keys() for entry in trainer.state.log_history)))
    report = {"ranks": gathered, "logged": names, "world_size": dist.get_world_size()}
    Path(output_dir, "report.json").write_text(json.dumps(report))
torch.manual_seed(0)
