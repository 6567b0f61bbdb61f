"""The numbers of a model that its memory depends on, read from its ``config.json`` alone.

The model is built on PyTorch's ``meta`` device (shapes, no storage), so a 70B model is measured
in a second and no weight file is ever read: every parameter's size, which of them are linear
layers (LoRA targets, autocast copies), what one decoder layer holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from sapo.builtin import BUILTIN_CHECKPOINTS, builtin_name, checkpoint_path


@dataclass(frozen=True)
class LinearLayer:
    """One ``nn.Linear`` of the model: its module name and its in and out features."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs of a decoder-only model; built by :func:`model_shape`.

    ``parameter_sizes`` lists every parameter's element count (tied weights once);
    ``layer_parameters`` is one decoder layer's; ``query_size`` and ``key_value_size`` are the
    widths of the attention's queries and of its keys (or values), heads times head size.
    """

    name: str
    architecture: str
    parameters: int
    parameter_sizes: tuple[int, ...]
    linear_layers: tuple[LinearLayer, ...]
    linear_parameters: int
    layer_parameters: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    query_size: int
    key_value_size: int
    vocab_size: int
    config_dtype: torch.dtype | None
    packs_pairs: bool  # sapo.packing.supports_packing for the attention and max_length given
    chunked_head: bool  # sapo.logprobs.chunkable_head: the LM head may run in chunks

    def lora_parameters(self, rank: int, targets: str | tuple[str, ...] | None) -> int:
        """Elements of one LoRA adapter of ``rank`` on ``targets`` (module-name suffixes,
        ``"all-linear"``, or ``None`` for PEFT's default of the query and value projections)."""
        return sum(rank * (layer.in_features + layer.out_features) for layer in self.lora_targets(targets))

    def lora_targets(self, targets: str | tuple[str, ...] | None) -> list[LinearLayer]:
        if targets is None:
            targets = ("q_proj", "v_proj")
        if targets == "all-linear" or targets == ("all-linear",):
            # PEFT's all-linear: every linear layer but the output layer
            return [layer for layer in self.linear_layers if not layer.name.endswith("lm_head")]
        if isinstance(targets, str):
            targets = (targets,)
        return [layer for layer in self.linear_layers if layer.name.split(".")[-1] in targets]


def load_model_config(
    name: str, revision: str | None = None, trust_remote_code: bool = False
) -> PretrainedConfig:
    """The config of ``name``: a ``config.json`` file, a folder holding one, a cached Hub id (at
    ``revision``), or a built-in model (``builtin:tiny``, ...); a config class the model ships runs
    only with ``trust_remote_code``. Never downloads; ``ValueError`` naming it otherwise."""
    builtin = builtin_name(name)
    if builtin is not None:
        if builtin in BUILTIN_CHECKPOINTS:
            return AutoConfig.from_pretrained(checkpoint_path(builtin))
        from sapo.builtin.tiny import char_tokenizer, tiny_llama

        with torch.device("meta"):
            return tiny_llama(char_tokenizer(), builtin).config
    hub = {"revision": revision} if revision is not None else {}
    try:
        return AutoConfig.from_pretrained(
            name, local_files_only=True, trust_remote_code=trust_remote_code, **hub
        )
    except Exception as error:
        raise ValueError(
            f"model_config: cannot read a model config from {name!r} offline: {' '.join(str(error).split())}"
        ) from error


def model_shape(
    config: PretrainedConfig,
    name: str = "",
    attn_implementation: str | None = None,
    max_length: int | None = None,
    trust_remote_code: bool = False,
) -> ModelShape:
    """Measure the model ``config`` describes, built on the meta device (no memory, no weights),
    with ``attn_implementation`` (default: transformers') for sequences up to ``max_length``; a
    model class the model ships is built only with ``trust_remote_code``."""
    from sapo.logprobs import chunkable_head
    from sapo.packing import supports_packing

    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    options["trust_remote_code"] = trust_remote_code
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **options)
    params = list(model.parameters())  # tied weights appear once
    linear = tuple(
        LinearLayer(module_name, module.in_features, module.out_features)
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    linear_weights = {id(module.weight): module.weight.numel() for module in model.modules()
                      if isinstance(module, torch.nn.Linear)}  # fmt: skip
    layers = model.get_decoder().layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        name=name or getattr(config, "_name_or_path", "") or type(model).__name__,
        architecture=type(model).__name__,
        parameters=sum(p.numel() for p in params),
        parameter_sizes=tuple(p.numel() for p in params),
        linear_layers=linear,
        linear_parameters=sum(linear_weights.values()),
        layer_parameters=sum(p.numel() for p in layers[0].parameters()),
        num_layers=len(layers),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=heads,
        query_size=heads * head_dim,
        key_value_size=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        vocab_size=config.vocab_size,
        config_dtype=getattr(config, "dtype", None),
        packs_pairs=supports_packing(model, max_length),
        chunked_head=chunkable_head(model) is not None,
    )
