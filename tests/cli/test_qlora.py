"""QLoRA from the command line, on the CPU (bitsandbytes quantizes to NF4 and runs its 8-bit
AdamW there): `--load_in_4bit`/`--load_in_8bit` (TRL's `ModelConfig` names) load every model
quantized, built-in ones included; SAPO-DPO trains a LoRA adapter on a 4-bit base and resumes
bit-identically; the EMA and reference adapters stay float32 beside a base that never changes;
`--optim adamw_bnb_8bit` (the paper's ORPO recipes) steps 8-bit states."""

import json
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from sapo_command import run_sapo, sapo_error_line

from sapo import SAPOConfig, SAPOTrainer
from sapo.builtin.tasks import task_dataset
from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.cli.arguments import ModelArguments
from sapo.cli.loading import load_model, lora_config
from sapo.copies.lora import EMA_ADAPTER, REFERENCE_ADAPTER, adapter_parameters
from sapo.data import prepare_dataset
from sapo.policy import check_master_precision

pytest.importorskip("bitsandbytes")

MODEL = "builtin:tiny-multiplication-sft"
TINY_RUN = ["--dataset_name", "builtin:multiplication", "--dataset_split", "preference",
            "--segment_length", "3", "--max_length", "32", "--max_prompt_length", "24",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--report_to", "none",
            "--use_cpu", "true", "--seed", "0"]  # fmt: skip
QLORA = [
    "--use_peft",
    "--load_in_4bit",
    "--lora_r",
    "4",
    "--lora_alpha",
    "8",
    "--lora_target_modules",
    "all-linear",
]


def linear_classes(model):
    return {type(module.weight).__name__ for name, module in model.named_modules() if name.endswith("q_proj")}


def test_sapo_dpo_on_a_4bit_base_resumes_to_the_same_adapter(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", MODEL, *QLORA, *TINY_RUN, "--loss_type", "dpo",
            "--max_steps", "6", "--save_steps", "3", "--output_dir", str(out)]  # fmt: skip
    status, _, err = run_sapo(argv)
    assert status == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not (out / "model.safetensors").exists()
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(out, uninterrupted)

    status, _, err = run_sapo([*argv, "--resume_from_checkpoint", str(out / "checkpoint-3")])
    assert status == 0, err
    for name in ("adapter_model.safetensors", "checkpoint-6/sapo_ema.safetensors",
                 "checkpoint-6/sapo_reference.safetensors"):  # fmt: skip
        first, resumed = load_file(uninterrupted / name), load_file(out / name)
        assert first.keys() == resumed.keys() and first
        assert all(torch.equal(first[key], resumed[key]) for key in first), name
        assert {tensor.dtype for tensor in first.values()} == {torch.float32}
    trained = load_file(out / "adapter_model.safetensors")
    assert any(key.endswith("lora_B.weight") and tensor.abs().sum() > 0 for key, tensor in trained.items())

    # the adapter folder answers on its base quantized again
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": "12*11="}]))
    argv = ["generate", "--suite", "alpaca-eval", "--model_name_or_path", str(out), "--load_in_4bit",
            "--prompts", str(prompts), "--output", str(tmp_path / "answers.json"),
            "--max_new_tokens", "6"]  # fmt: skip
    assert run_sapo(argv)[0] == 0
    assert json.loads((tmp_path / "answers.json").read_text())[0]["output"]


def test_ema_and_reference_adapters_on_a_quantized_base(tmp_path):
    tokenizer = char_tokenizer()
    model_args = ModelArguments(
        MODEL, use_peft=True, load_in_4bit=True, lora_r=4, lora_target_modules=["all-linear"]
    )
    model = load_model(model_args, tokenizer)
    rows = prepare_dataset(task_dataset("multiplication", "preference").select(range(32)), tokenizer, 32, 24)
    args = SAPOConfig(output_dir=str(tmp_path), loss_type="dpo", segment_length=3, max_length=32,
                      max_prompt_length=24, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                      ref_model_sync_steps=2, use_cpu=True, report_to="none", save_strategy="no")  # fmt: skip
    trainer = SAPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                          peft_config=lora_config(model_args))  # fmt: skip
    model = trainer.model
    quantized = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert quantized and linear_classes(model) == {"Params4bit"}
    initial = {k: v.detach().clone() for k, v in adapter_parameters(model, "default").items()}
    trainer.train()

    assert all(torch.equal(p, quantized[n]) for n, p in model.named_parameters() if n in quantized)
    policy, ema = adapter_parameters(model, "default"), adapter_parameters(model, EMA_ADAPTER)
    reference = adapter_parameters(model, REFERENCE_ADAPTER)
    assert {p.dtype for adapter in (policy, ema, reference) for p in adapter.values()} == {torch.float32}
    assert any(not torch.equal(initial[k], policy[k]) for k in initial), "the policy adapter did not train"
    assert any(not torch.equal(policy[k], ema[k]) for k in policy)  # the EMA trails the policy
    assert any(not torch.equal(initial[k], ema[k]) for k in ema)
    assert all(torch.equal(reference[k], ema[k]) for k in ema)  # synced from the EMA at step 2
    for name, value in trainer.ema.shadow.items():  # the float32 master of the EMA adapter
        torch.testing.assert_close(ema[name], value)


def test_the_float32_master_guard_passes_qlora_computing_in_bfloat16(tmp_path):
    tokenizer = char_tokenizer()
    model_args = ModelArguments(MODEL, use_peft=True, load_in_4bit=True, torch_dtype="bfloat16")
    model = load_model(model_args, tokenizer)
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(model_args))
    args = SAPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    # the adapters train in float32 over the 4-bit base: nothing is stepped in bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    one_device = types.SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None, mixed_precision="bf16")
    check_master_precision(model, args, one_device)


def test_every_built_in_model_loads_quantized():
    tokenizer = char_tokenizer()
    random_tiny = load_model(
        ModelArguments("builtin:tiny", load_in_4bit=True, use_peft=True), tokenizer, seed=3
    )
    assert linear_classes(random_tiny) == {"Params4bit"}
    # built from the same seed as without quantization: the unquantized parameters are equal
    reference = tiny_llama(tokenizer, "tiny", seed=3)
    torch.testing.assert_close(random_tiny.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    nested = load_model(ModelArguments(MODEL, load_in_4bit=True, use_bnb_nested_quant=True), tokenizer)
    assert nested.model.layers[0].self_attn.q_proj.weight.quant_state.nested
    assert linear_classes(load_model(ModelArguments(MODEL, load_in_8bit=True), tokenizer)) == {"Int8Params"}


def test_quantization_flags_fail_naming_the_fix(tmp_path, monkeypatch):
    base = ["--model_name_or_path", MODEL, "--dataset_name", "builtin:multiplication", "--max_steps", "1",
            "--use_cpu", "true", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    line = sapo_error_line(["train", *base, "--load_in_4bit"])
    assert "load_in_4bit" in line and "--use_peft" in line
    assert "--use_peft" in sapo_error_line(["sft", *base, "--load_in_8bit"])
    assert "load_in_4bit" in sapo_error_line(["spin", *base, "--load_in_4bit", "--use_peft"])
    assert "load_in_8bit" in sapo_error_line(["train", *base, *QLORA, "--load_in_8bit"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # the extra not installed
    assert "sapo[qlora]" in sapo_error_line(["train", *base, *QLORA])
    assert not (tmp_path / "out").exists()


def test_adamw_bnb_8bit_steps_8bit_states(tmp_path):
    out = tmp_path / "orpo"
    argv = ["train", "--model_name_or_path", "builtin:tiny", *TINY_RUN, "--loss_type", "orpo",
            "--beta", "0.05", "--optim", "adamw_bnb_8bit", "--max_steps", "2", "--save_steps", "2",
            "--output_dir", str(out)]  # fmt: skip
    status, _, err = run_sapo(argv)
    assert status == 0, err
    states = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    # bitsandbytes saves each parameter's moments under one key; embeddings keep float32 moments
    moments = [state.get("__bnb_optimizer_quant_state__", state) for state in states.values()]
    assert any(m["state1"].dtype == m["state2"].dtype == torch.uint8 for m in moments)  # blockwise 8-bit
    trained = load_file(out / "model.safetensors")
    initial = tiny_llama(char_tokenizer(), "tiny", seed=0).state_dict()
    assert any(not torch.equal(trained[name], initial[name]) for name in trained)
