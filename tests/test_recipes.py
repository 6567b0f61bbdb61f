"""Every recipe parses into its command's dataclasses, offline, and the paper's recipes hold its
numbers; every training recipe names its hardware, is launched for it and fits it (`sapo plan`)."""

import json
import re
from pathlib import Path

import pytest
from trl import SFTConfig

from sapo.cli import main
from sapo.cli.arguments import ArgumentParser, DataArguments, ModelArguments
from sapo.cli.commands import train_arguments
from sapo.cli.demo import DemoArguments

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
COMMAND_OF = {
    "llama-3-8b/sft.yaml": "sft",
    "llama-3-8b/sapo-dpo.yaml": "train",
    "llama-3-8b/sapo-orpo.yaml": "train",
    "llama-3-8b/sapo-dpo-lora.yaml": "train",
    "llama-3-8b/sapo-dpo-qlora.yaml": "train",
    "mistral-7b/sapo-dpo.yaml": "train",
    "mistral-7b/sapo-orpo.yaml": "train",
    "warm-start/tiny-multiplication-sft.yaml": "sft",
    "warm-start/tiny-long-multiplication-sft.yaml": "sft",
    "warm-start/tiny-worked-multiplication-sft.yaml": "sft",
    "warm-start/tiny-sorting-sft.yaml": "sft",
    "warm-start/tiny-wide-worked-multiplication-sft.yaml": "sft",
    "warm-start/micro-worked-multiplication-sft.yaml": "sft",
    "demo/demo.yaml": "demo",
}
DATACLASSES = {
    "train": train_arguments(),
    "sft": (SFTConfig, ModelArguments, DataArguments),
    "demo": (DemoArguments,),
}
PAPER_RUNS = {
    "llama-3-8b/sapo-dpo.yaml": ("outputs/llama-3-8b-sft", "dpo"),
    "mistral-7b/sapo-dpo.yaml": ("wandb/mistral-7b-zephyr-sft", "dpo"),
    "llama-3-8b/sapo-orpo.yaml": ("meta-llama/Meta-Llama-3-8B", "orpo"),
    "mistral-7b/sapo-orpo.yaml": ("mistralai/Mistral-7B-v0.1", "orpo"),
}


def load(name):
    command = COMMAND_OF[name]
    # the paper's runs ask for bf16, which TrainingArguments refuses on a machine without a GPU
    # unless told to use the CPU; that one flag is the only change
    flags = ["--use_cpu", "true"] if command != "demo" else []
    return ArgumentParser(DATACLASSES[command], f"sapo {command}").parse(
        ["--config", str(RECIPES / name), *flags]
    )


def test_every_recipe_is_listed():
    # recipes/accelerate/ holds launcher configs for `accelerate launch`, not sapo recipes
    names = [
        str(path.relative_to(RECIPES)) for path in RECIPES.rglob("*.yaml") if path.parent.name != "accelerate"
    ]
    assert sorted(names) == sorted(COMMAND_OF)


@pytest.mark.parametrize("name", sorted(COMMAND_OF))
def test_recipe_parses(name):
    parsed = load(name)
    assert [type(instance) for instance in parsed] == list(DATACLASSES[COMMAND_OF[name]])


@pytest.mark.parametrize("name", sorted(PAPER_RUNS))
def test_paper_runs_use_the_papers_settings(name):
    config, model_args, data_args, *_ = load(name)
    model, loss_type = PAPER_RUNS[name]
    assert model_args.model_name_or_path == model and config.loss_type == loss_type
    assert (data_args.dataset_name, data_args.messages_column) == (
        "argilla/distilabel-capybara-dpo-7k-binarized",
        "chosen",
    )
    # 8 GPUs x 8 per device = global batch 64, 4 epochs, lengths, segment, EMA, buffer, precision, seed
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (8, 1)
    assert config.num_train_epochs == 4
    assert (config.max_length, config.max_prompt_length, config.segment_length) == (2048, 1792, 256)
    assert (config.ema_decay, config.replay_buffer_size) == (0.5, 2000)
    assert (config.temperature, config.top_p, config.top_k) == (0.7, 0.95, 50)
    assert config.bf16 and config.gradient_checkpointing and config.seed == 42
    # as the paper ran them: 8 GPUs under ZeRO-3, float32 master weights computing in bfloat16
    hardware = load(name)[-1]
    assert (hardware.distributed, hardware.num_gpus, model_args.torch_dtype) == ("zero3", 8, "float32")
    if loss_type == "dpo":
        assert (config.learning_rate, config.lr_scheduler_type, config.warmup_steps) == (5e-7, "linear", 0.1)
        assert (config.optim, config.beta, config.ref_model_sync_steps) == ("rmsprop", 0.1, None)
    else:
        assert (config.learning_rate, config.lr_scheduler_type, config.warmup_steps) == (
            5e-6,
            "inverse_sqrt",
            100,
        )
        assert (config.optim, config.beta) == ("adamw_bnb_8bit", 0.05)
        assert model_args.chat_template is not None  # base models bring none


def test_llama_sft_warm_start():
    config, model_args, data_args = load("llama-3-8b/sft.yaml")
    assert (model_args.model_name_or_path, data_args.dataset_name, data_args.dataset_split) == (
        "meta-llama/Meta-Llama-3-8B", "HuggingFaceH4/deita-10k-v0-sft", "train_sft"
    )  # fmt: skip
    assert (config.num_train_epochs, config.learning_rate, config.lr_scheduler_type) == (3, 2e-5, "cosine")
    assert config.output_dir == PAPER_RUNS["llama-3-8b/sapo-dpo.yaml"][0]  # the DPO run starts from it


def test_lora_variant_keeps_the_global_batch_on_one_gpu():
    config, model_args, *_, hardware = load("llama-3-8b/sapo-dpo-lora.yaml")
    assert model_args.use_peft and model_args.lora_target_modules == ["all-linear"]
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 64
    assert (hardware.distributed, hardware.num_gpus) == ("single", 1)


def test_qlora_variant_is_the_lora_variant_on_a_4bit_base_for_one_24_gb_gpu():
    config, model_args, *_, hardware = load("llama-3-8b/sapo-dpo-qlora.yaml")
    lora_config, lora_args, *_ = load("llama-3-8b/sapo-dpo-lora.yaml")
    assert model_args.use_peft and model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4"
    assert model_args.torch_dtype == "bfloat16" and model_args.lora_target_modules == ["all-linear"]
    assert (hardware.distributed, hardware.num_gpus, hardware.gpu_memory_gb) == ("single", 1, 24)
    # the paper's lengths, segment, EMA and buffer; the global batch halved to fit the sampling call
    for field in ("max_length", "max_prompt_length", "segment_length", "ema_decay", "replay_buffer_size",
                  "beta", "learning_rate", "optim", "gradient_checkpointing"):  # fmt: skip
        assert getattr(config, field) == getattr(lora_config, field), field
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 32


TRAINING_RECIPES = sorted(name for name, command in COMMAND_OF.items() if command == "train")


@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_the_launch_line_runs_where_the_recipe_plans(name):
    from accelerate.commands.config.config_args import load_config_from_file

    hardware = load(name)[-1]
    text = (RECIPES / name).read_text()
    launch = re.search(r"^#\s+(accelerate launch .*|sapo train .*)$", text, re.MULTILINE).group(1)
    assert f"--config recipes/{name}" in launch
    if hardware.distributed == "single":
        assert launch.startswith("sapo train") and hardware.num_gpus == 1
    else:
        launcher = re.search(r"--config_file (\S+)", launch).group(1)
        assert Path(launcher).stem == hardware.distributed
        assert load_config_from_file(str(RECIPES.parent / launcher)).num_processes == hardware.num_gpus
    assert (RECIPES.parent / hardware.model_config).is_file()  # the plan reads it offline


@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_every_training_recipe_fits_the_hardware_it_names(name, capsys, monkeypatch):
    monkeypatch.chdir(RECIPES.parent)
    assert main(["plan", "--config", f"recipes/{name}"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    hardware = load(name)[-1]
    assert plan["fits"] is True and plan["per_device_gb"] > 0
    assert (plan["num_gpus"], plan["gpu_memory_gb"], plan["distributed"]) == (
        hardware.num_gpus, hardware.gpu_memory_gb, hardware.distributed
    )  # fmt: skip


def test_chat_template_renders_the_prompt_as_a_prefix():
    from sapo.builtin.tiny import char_tokenizer
    from sapo.data import tokenize_rows

    _, model_args, *_ = load("llama-3-8b/sapo-orpo.yaml")
    tokenizer = char_tokenizer()  # stands in for the Llama tokenizer: same template, EOS <|end|>
    tokenizer.chat_template = model_args.chat_template
    (prompt_ids,), (gold_ids,) = tokenize_rows(
        [[{"role": "user", "content": "2+2="}]], [{"role": "assistant", "content": "4"}], tokenizer
    )
    assert tokenizer.decode(prompt_ids) == "<|user|>\n2+2=<|end|>\n<|assistant|>\n"
    assert tokenizer.decode(gold_ids) == "4<|end|>"


def test_demo_recipe_spells_out_the_demo_defaults():
    (args,) = load("demo/demo.yaml")
    assert args == DemoArguments()


@pytest.mark.parametrize("task", ["multiplication", "long-multiplication"])
def test_warm_start_recipes_are_offline(task):
    config, model_args, data_args = load(f"warm-start/tiny-{task}-sft.yaml")
    assert model_args.model_name_or_path == "builtin:tiny" and data_args.dataset_name == f"builtin:{task}"


@pytest.mark.parametrize("name", ["multi_gpu.yaml", "zero2.yaml", "zero3.yaml", "fsdp2.yaml"])
def test_accelerate_launcher_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(RECIPES / "accelerate" / name))
    assert config.num_processes == 8 and config.mixed_precision == "bf16"
    if name == "fsdp2.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
