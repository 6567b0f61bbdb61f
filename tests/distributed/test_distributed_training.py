"""Two CPU processes under torchrun (gloo): training, logging, checkpoints, resume, LoRA, and the
same through DeepSpeed ZeRO-2 and ZeRO-3 (DeepSpeed's CPU accelerator) and FSDP2.

With FSDP2 and its sharded checkpoints, Trainer's `save_model` writes no whole model (it does with
FULL_STATE_DICT, which transformers fails to save on CPU processes for tied embeddings)."""

import json
from pathlib import Path

import launch
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sapo.builtin.tiny import char_tokenizer, tiny_llama

SCRIPT = Path(__file__).with_name("distributed_train.py")


def torchrun(*args):
    launch.torchrun(SCRIPT, *args)
    return json.loads(Path(args[0], "report.json").read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("ddp")
    return output, torchrun(output, 4)


def test_two_processes_train_log_and_checkpoint(full_run):
    output, report = full_run
    assert report["world_size"] == 2
    for rank in report["ranks"]:
        assert rank["calls"] == [4, 4, 4, 4]  # one batched call per step, for the rank's own 4 rows
    assert report["ranks"][0]["weights"] == report["ranks"][1]["weights"]
    assert {"rewards/margins", "sapo/buffer_size", "loss"} <= set(report["logged"])
    checkpoint = output / "checkpoint-2"
    assert (checkpoint / "sapo_rank0.safetensors").exists() and (
        checkpoint / "sapo_rank1.safetensors"
    ).exists()
    assert not (output / ".staging").exists()


def test_two_processes_resume_identically(full_run, tmp_path):
    output, report = full_run
    resumed = torchrun(output, 4, output / "checkpoint-2")
    assert [rank["calls"] for rank in resumed["ranks"]] == [[4, 4], [4, 4]]
    assert resumed["ranks"][0]["weights"] == report["ranks"][0]["weights"]


def test_two_processes_lora_adapter_loads(tmp_path):
    report = torchrun(tmp_path, 3, "--lora")
    assert report["ranks"][0]["weights"] == report["ranks"][1]["weights"]
    model = PeftModel.from_pretrained(tiny_llama(char_tokenizer(), seed=0), str(tmp_path / "final"))
    assert set(model.peft_config) == {"default"}
    logits = model(torch.tensor([[4, 20, 21]])).logits
    assert torch.isfinite(logits).all()


LAUNCHES = {
    # LoRA with ZeRO-2: weights replicated, EMA and reference as adapters
    "zero2-lora": (["--lora", "--zero", 2], ["AdapterEMA", "AdapterReference"]),
    # LoRA with ZeRO-3: the three adapters partitioned with the model; bfloat16, checkpointing
    "zero3-lora-bf16": (["--lora", "--zero", 3, "--bf16"], ["AdapterEMA", "AdapterReference"]),
    # LoRA with FSDP2: the three adapters sharded with the model
    "fsdp2-lora": (["--lora", "--fsdp2"], ["AdapterEMA", "AdapterReference"]),
    # ZeRO-3, the policy arrives whole: partitioned copies when training starts
    "zero3": (["--zero", 3], ["ZeroEMA", "ZeroReference"]),
    # ZeRO-3, the policy arrives partitioned (zero.Init), bfloat16 and gradient checkpointing
    "zero3-init-bf16": (["--zero", 3, "--zero-init", "--bf16"], ["ZeroEMA", "ZeroReference"]),
    # FSDP2 through Trainer + accelerate (accelerate's CPU check lifted in the worker), bfloat16
    "fsdp2-bf16": (["--fsdp2", "--bf16"], ["ShardedEMA", "ShardedReference"]),
}


@pytest.mark.parametrize("launch_name", sorted(LAUNCHES))
def test_sharded_training_trains_checkpoints_and_resumes_identically(tmp_path, launch_name):
    options, copies = LAUNCHES[launch_name]
    output = tmp_path / "run"
    report = torchrun(output, 4, *options)
    for rank in report["ranks"]:
        assert rank["calls"] == [4, 4, 4, 4] and rank["copies"] == copies
        assert rank["partitioned_at_start"] == ("--zero-init" in options)
        # sharded or partitioned like the policy, except under ZeRO-2 (weights replicated)
        assert rank["distributed_copies"] == [launch_name != "zero2-lora"] * 2
        assert rank["ema_dtype"] == "torch.float32"  # also when the policy trains in bfloat16
        # sharded copies are gathered for generation in the policy's compute precision
        bf16 = "--bf16" in options
        assert rank["sampling_dtype"] == ("torch.bfloat16" if bf16 else "torch.float32")
    # at the first step the reference is the policy: no margin, up to bfloat16 rounding (the
    # policy's forward runs with gradients, the reference's without, on other kernels)
    margin = report["ranks"][0]["first_margin"]
    assert abs(margin) < 0.01 if "--bf16" in options else margin == 0.0
    assert report["ranks"][0]["weights"] == report["ranks"][1]["weights"]
    assert {"rewards/margins", "sapo/buffer_size", "loss"} <= set(report["logged"])
    resumed = torchrun(output, 4, output / "checkpoint-2", *options)
    assert [rank["calls"] for rank in resumed["ranks"]] == [[4, 4], [4, 4]]
    assert resumed["ranks"][0]["weights"] == report["ranks"][0]["weights"]
    base = tiny_llama(char_tokenizer(), seed=0)
    # with FSDP2's sharded checkpoints Trainer's save_model writes no whole model to load
    if "--lora" in options and "--fsdp2" not in options:
        model = PeftModel.from_pretrained(base, str(output / "final"))
        assert set(model.peft_config) == {"default"}
    elif "--zero" in options:  # ZeRO-3 gathers the policy: it loads without DeepSpeed
        model = AutoModelForCausalLM.from_pretrained(output / "final")
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())
