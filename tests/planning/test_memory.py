"""The memory plan's pieces: model shapes equal to what transformers and PEFT build, activation
bytes equal to what autograd keeps, and placements that divide what they partition."""

import contextlib
import random
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.packing import mask_for, pack_pairs
from sapo.pairs import Pair
from sapo.planning import GIB, Setup, load_model_config, model_shape, plan_memory
from sapo.planning.memory import ACTIVATIONS, FITS_UNDER, layer_activation_bytes

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SMALL = dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2)
LORA_TARGETS = {"lora-all": "all-linear", "lora-attention": ("q_proj", "v_proj")}


def pairs(count: int, length: int = 16, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    draw = lambda: [rng.randrange(7, 100) for _ in range(length)]  # noqa: E731
    return [Pair(draw(), draw(), draw()) for _ in range(count)]


def build(layers: int, regime: str, kind: str):
    """A small Llama in ``regime``'s precision, LoRA-wrapped for the LoRA kinds."""
    model = tiny_llama(char_tokenizer(), size="small", num_hidden_layers=layers, **SMALL)
    if regime.startswith("bfloat16") and regime != "bfloat16":
        model.to(torch.bfloat16)  # a bfloat16 base under float32 adapters
    if kind != "full":
        model = get_peft_model(model, LoraConfig(r=8, target_modules=LORA_TARGETS[kind], lora_dropout=0.0))
    if regime == "bfloat16":
        model.to(torch.bfloat16)  # everything, adapters too (DeepSpeed's bf16 module)
    return model.train()


def saved_bytes(model, batch, regime: str) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward (weights excluded)."""
    weights = {param.untyped_storage().data_ptr() for param in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if "autocast" in regime else contextlib.nullcontext()
    )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model(
            input_ids=batch["input_ids"],
            attention_mask=mask_for(model, batch["attention_mask"]),
            position_ids=batch["position_ids"],
            logits_to_keep=1,
        )
    return sum(kept.values())


@pytest.mark.parametrize("regime, kind", sorted(ACTIVATIONS))
def test_activation_table_is_what_autograd_keeps(regime, kind):
    # per token and decoder layer: the difference between 3 and 2 layers, 4 and 2 pairs (what
    # does not grow with both, such as the weight copies autocast keeps, cancels out)
    tokenizer = char_tokenizer()
    batches = {count: pack_pairs(pairs(count), tokenizer.pad_token_id) for count in (2, 4)}
    measured = {
        (layers, count): saved_bytes(build(layers, regime, kind), batches[count], regime)
        for layers in (2, 3)
        for count in (2, 4)
    }
    tokens = batches[4]["input_ids"].numel() - batches[2]["input_ids"].numel()
    per_token_layer = (measured[3, 4] - measured[2, 4] - measured[3, 2] + measured[2, 2]) / tokens
    width = batches[4]["input_ids"].shape[1]
    shape = model_shape(tiny_llama(tokenizer, size="small", num_hidden_layers=2, **SMALL).config)
    rank = None if kind == "full" else 8
    planned = layer_activation_bytes(shape, regime, width, rank, LORA_TARGETS.get(kind))
    assert planned == pytest.approx(per_token_layer, rel=0.03)


def test_model_shape_counts_what_transformers_and_peft_build():
    model = tiny_llama(char_tokenizer(), size="small", **SMALL)
    shape = model_shape(model.config)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.layer_parameters == sum(p.numel() for p in model.model.layers[0].parameters())
    for targets in ("all-linear", ("q_proj", "v_proj")):
        adapted = get_peft_model(
            tiny_llama(char_tokenizer(), size="small", **SMALL), LoraConfig(r=8, target_modules=targets)
        )
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        assert shape.lora_parameters(8, targets) == trainable


def test_the_shipped_paper_configs_are_the_paper_models():
    llama = model_shape(load_model_config(str(RECIPES / "llama-3-8b" / "config.json")))
    mistral = model_shape(load_model_config(str(RECIPES / "mistral-7b" / "config.json")))
    assert (llama.architecture, llama.parameters, llama.vocab_size) == (
        "LlamaForCausalLM",
        8_030_261_248,
        128_256,
    )
    assert (mistral.architecture, mistral.parameters, mistral.vocab_size) == (
        "MistralForCausalLM",
        7_241_732_096,
        32_000,
    )


@pytest.fixture(scope="module")
def llama():
    return model_shape(load_model_config(str(RECIPES / "llama-3-8b" / "config.json")), max_length=2048)


def paper_setup(distributed: str, **overrides) -> Setup:
    settings = dict(
        distributed=distributed, num_devices=1 if distributed == "single" else 8, optimizer="rmsprop"
    )
    return Setup(**{**settings, **overrides})


def test_a_7b_policy_with_its_ema_and_reference_does_not_fit_80_gb_under_ddp(llama):
    # float32 weights, gradients, RMSprop state and EMA plus the reference: over 80 GB before activations
    ddp = plan_memory(llama, paper_setup("ddp"))
    resident = sum(
        ddp.parts[name] for name in ("policy weights", "optimizer state", "EMA (float32)", "reference")
    )
    assert resident > 80 * GIB
    assert plan_memory(llama, paper_setup("zero3")).peak < FITS_UNDER * 80 * GIB


def test_zero3_partitions_what_it_partitions(llama):
    two, eight = (plan_memory(llama, paper_setup("zero3", num_devices=n)) for n in (2, 8))
    for name in ("policy weights", "float32 master weights", "optimizer state", "EMA (float32)", "reference"):
        assert two.parts[name] / eight.parts[name] == pytest.approx(4, rel=0.01)
    # sampling gathers one whole copy of the EMA, in the compute dtype, whatever the devices
    assert (
        two.parts["EMA gathered for sampling"]
        == eight.parts["EMA gathered for sampling"]
        == 2 * llama.parameters
    )


def test_lora_and_checkpointing_shrink_what_they_should(llama):
    full, lora = (
        plan_memory(llama, paper_setup("single")),
        plan_memory(llama, paper_setup("single", lora_rank=16)),
    )
    assert lora.parts["optimizer state"] < full.parts["optimizer state"] / 100
    assert lora.parts["EMA (float32)"] < full.parts["EMA (float32)"] / 100
    plan = plan_memory(llama, paper_setup("zero3"))
    assert plan.activations["with checkpointing"] < plan.activations["without checkpointing"] / 5
    unchecked = plan_memory(llama, paper_setup("zero3", gradient_checkpointing=False))
    assert unchecked.parts["activations"] == plan.activations["without checkpointing"]


def test_orpo_plans_no_reference(llama):
    plan = plan_memory(llama, paper_setup("zero3", loss_type="orpo"))
    assert plan.parts["reference"] == 0 and "reference pass" not in plan.phases


def test_bad_setups_name_their_field():
    with pytest.raises(ValueError, match="distributed='zero4'"):
        Setup(distributed="zero4")
    with pytest.raises(ValueError, match="num_gpus=8"):
        Setup(distributed="single", num_devices=8)
