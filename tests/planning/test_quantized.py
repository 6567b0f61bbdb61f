"""The memory plan of a base quantized by bitsandbytes (QLoRA): the bytes it holds per weight,
which layers it quantizes, the activations a LoRA on it keeps, and the plan of a 4-bit recipe."""

import tempfile
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_memory import LORA_TARGETS, RECIPES, SMALL, pairs, saved_bytes
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.packing import pack_pairs
from sapo.planning import GIB, Setup, load_model_config, model_shape, plan_memory
from sapo.planning.memory import layer_activation_bytes
from sapo.planning.quantized import base_weight_bytes, quantized_layer_bytes, quantized_layers

pytest.importorskip("bitsandbytes")


def quantized_small(bits: int, nested: bool = False, dtype=torch.float32, layers: int = 2):
    """The small Llama saved and loaded back quantized, as `sapo train --load_in_4bit` loads it."""
    with tempfile.TemporaryDirectory() as folder:
        tiny_llama(char_tokenizer(), size="small", num_hidden_layers=layers, **SMALL).save_pretrained(folder)
        quantization = BitsAndBytesConfig(
            load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_use_double_quant=nested,
            bnb_4bit_compute_dtype=dtype,
        )  # fmt: skip
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=dtype)


def held_bytes(weight) -> int:
    """Bytes bitsandbytes allocated for one quantized weight: the packed weight and its constants."""
    total = weight.numel() * weight.element_size()
    if type(weight).__name__ == "Int8Params":
        return total + weight.SCB.numel() * weight.SCB.element_size()
    state = weight.quant_state
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return total + sum(tensor.numel() * tensor.element_size() for tensor in tensors)


@pytest.mark.parametrize("bits, nested", [(4, False), (4, True), (8, False)])
def test_quantized_bytes_are_what_bitsandbytes_holds(bits, nested):
    model = quantized_small(bits, nested)
    shape = model_shape(tiny_llama(char_tokenizer(), size="small", num_hidden_layers=2, **SMALL).config)
    modules = dict(model.named_modules())
    for layer in quantized_layers(shape):
        weight = modules[layer.name].weight
        assert type(weight).__name__ == ("Params4bit" if bits == 4 else "Int8Params"), layer.name
        assert quantized_layer_bytes(layer, bits, nested) == held_bytes(weight), layer.name
    # what stays unquantized (embeddings, norms, the head) is held as loaded, in float32 here
    kept = sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype == torch.float32)
    quantized = sum(held_bytes(modules[layer.name].weight) for layer in quantized_layers(shape))
    assert base_weight_bytes(shape, 4, bits, nested) == kept + quantized


def test_every_linear_layer_but_the_head_is_quantized():
    model = quantized_small(4)
    shape = model_shape(tiny_llama(char_tokenizer(), size="small", num_hidden_layers=2, **SMALL).config)
    quantized = {name for name, module in model.named_modules() if type(module).__name__ == "Linear4bit"}
    assert quantized == {layer.name for layer in quantized_layers(shape)}
    assert "lm_head" not in quantized and len(quantized) == 14


@pytest.mark.parametrize(
    "dtype, regime, kind",
    [(torch.bfloat16, "bfloat16-autocast", "lora-all"), (torch.float32, "float32", "lora-attention")],
)
def test_lora_on_a_4bit_base_keeps_the_activations_of_lora_on_a_16bit_one(dtype, regime, kind):
    # per token and decoder layer, as tests/planning/test_memory.py measures the table
    tokenizer = char_tokenizer()
    batches = {count: pack_pairs(pairs(count), tokenizer.pad_token_id) for count in (2, 4)}
    measured = {}
    for layers in (2, 3):
        for count in (2, 4):
            lora = LoraConfig(r=8, target_modules=LORA_TARGETS[kind], lora_dropout=0.0)
            model = get_peft_model(quantized_small(4, dtype=dtype, layers=layers), lora).train()
            measured[layers, count] = saved_bytes(model, batches[count], regime)
    tokens = batches[4]["input_ids"].numel() - batches[2]["input_ids"].numel()
    per_token_layer = (measured[3, 4] - measured[2, 4] - measured[3, 2] + measured[2, 2]) / tokens
    shape = model_shape(tiny_llama(tokenizer, size="small", num_hidden_layers=2, **SMALL).config)
    width = batches[4]["input_ids"].shape[1]
    assert layer_activation_bytes(shape, regime, width, 8, LORA_TARGETS[kind]) == per_token_layer


def test_a_4bit_base_holds_about_half_a_byte_per_weight():
    shape = model_shape(load_model_config(str(RECIPES / "llama-3-8b" / "config.json")), max_length=2048)
    lora = Setup(weight_bytes=2, lora_rank=16, lora_targets="all-linear", pairs_per_step=2)
    qlora = replace(lora, quantized_bits=4)
    nested = replace(lora, quantized_bits=4, nested_quantization=True)
    weights = {name: plan_memory(shape, setup).parts["policy weights"] for name, setup in
               (("lora", lora), ("qlora", qlora), ("nested", nested))}  # fmt: skip
    head_and_embeddings = 2 * 2 * 128256 * 4096  # bfloat16, never quantized
    quantized = shape.parameters - 2 * 128256 * 4096
    adapters = 4 * shape.lora_parameters(16, "all-linear")
    assert weights["qlora"] == pytest.approx(
        head_and_embeddings + (0.5 + 4 / 64) * quantized + adapters, rel=1e-3
    )
    assert weights["nested"] == pytest.approx(
        head_and_embeddings + (0.5 + 1 / 64) * quantized + adapters, rel=1e-3
    )
    assert weights["nested"] < weights["qlora"] < weights["lora"] / 2.5
    assert 5 * GIB < weights["nested"] < 6 * GIB
    with pytest.raises(ValueError, match="single, ddp"):
        replace(qlora, distributed="zero3", num_devices=8)
    with pytest.raises(ValueError, match="LoRA"):
        replace(qlora, lora_rank=None)
