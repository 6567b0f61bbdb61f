"""Run by test_distributed_engines.py under `torchrun --nproc_per_node 2` (CPU, gloo):

    torchrun --nproc_per_node 2 distributed_worker.py OUT zero3|fsdp2

SAPO-DPO with `generation_backend="vllm"` for 2 steps, the policy under DeepSpeed ZeRO-3 (its CPU
accelerator) or FSDP2, so the EMA is partitioned or sharded like it and each rank's engine receives
it gathered a weight at a time. Rank 0 writes `report.json`: per rank, the EMA's class, the number
of pushes, the tied fractions, and the greedy tokens of the engine and of the own loop on the
gathered EMA after training.
"""

import json
import random
import sys
from pathlib import Path

import datasets
import torch.distributed as dist
import transformers
from datasets import Dataset
from fsdp_on_cpu import allow_fsdp_on_cpu

from sapo import SAPOConfig, SAPOTrainer
from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.sampling import Sampler
from sapo.sampling import vllm as sampling_vllm

transformers.logging.set_verbosity_error()
datasets.disable_progress_bars()
output_dir, placement = sys.argv[1], sys.argv[2]
if placement == "fsdp2":
    allow_fsdp_on_cpu()
    layers = {
        "fsdp_version": 2,
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "reshard_after_forward": True,
    }
    distributed = {"fsdp": True, "fsdp_config": {**layers, "state_dict_type": "SHARDED_STATE_DICT"}}
else:
    zero = {"stage": 3}
    distributed = {"deepspeed": {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": zero}}
draws = random.Random(0)
rows = [
    {"prompt": f"{a}+{b}=", "completion": str(a + b)}
    for a, b in ((draws.randint(10, 99), draws.randint(10, 99)) for _ in range(64))
]
tokenizer = char_tokenizer()
args = SAPOConfig(
    output_dir=output_dir, max_steps=2, per_device_train_batch_size=4, segment_length=4, learning_rate=1e-3,
    max_length=64, save_strategy="no", logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True,
    seed=0, generation_backend="vllm", vllm_kv_cache_gib=0.25, **distributed,
)  # fmt: skip
trainer = SAPOTrainer(
    model=tiny_llama(tokenizer, "small", seed=0, tie_word_embeddings=False),
    args=args,
    train_dataset=Dataset.from_list(rows),
    processing_class=tokenizer,
)
pushes = []
push = sampling_vllm._Engine.push
sampling_vllm._Engine.push = lambda engine, *weights: (pushes.append(1), push(engine, *weights))
trainer.train()

prefixes, limits = [[8, 9, 10, 11], [20, 21], [40, 41, 42, 43, 44]], [8, 8, 8]
with trainer.ema.sampling_model(whole=False) as model:  # as stored: the push gathers each weight
    engine = Sampler.greedy(tokenizer.pad_token_id, [2], backend=trainer.sampler.backend)
    from_engine = engine.generate(model, prefixes, limits, version=trainer.ema.num_updates + 1)
with trainer.ema.sampling_model() as model:
    from_loop = Sampler.greedy(tokenizer.pad_token_id, [2]).generate(model, prefixes, limits)
logged = trainer.state.log_history
report = {
    "ema": type(trainer.ema).__name__,
    "sharded": trainer.ema.sharded,
    "pushes": len(pushes),
    "tied": [entry["sapo/tied_fraction"] for entry in logged if "sapo/tied_fraction" in entry],
    "engine": from_engine,
    "loop": from_loop,
}
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, report)
if dist.get_rank() == 0:
    Path(output_dir, "report.json").write_text(json.dumps(gathered))
