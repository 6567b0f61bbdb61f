"""Bytes per device of a SAPO run, part by part and phase by phase: arithmetic on a
:class:`~sapo.planning.shape.ModelShape` and a :class:`Setup`, nothing allocated.

A step passes through four phases; the plan's peak is the largest (:class:`MemoryPlan`):

- **sampling**: what stays resident, plus the EMA gathered whole (ZeRO-3, FSDP2), the KV cache
  and one layer's prefill;
- **reference pass** (DPO): resident, plus the reference's logits and one layer's work;
- **training pass**: resident, plus the saved activations, the logits of the scored positions and
  their gradient, the weights gathered (ZeRO-3, FSDP2) or cast (autocast) for the forward;
- **optimizer step**: resident, plus the gradients and the optimizer's temporaries.

Activation bytes per token and decoder layer (:data:`ACTIVATIONS`) are what autograd saves in a
Llama-style decoder layer (``sdpa`` attention with SAPO's 4D mask, queries as wide as the hidden
state), measured on the CPU in each precision; ``tests/planning/test_memory.py`` checks them
against PyTorch's saved tensors. Where each library keeps what (DeepSpeed ZeRO-2/3, FSDP2, DDP)
follows its defaults; ``docs/scaling.md`` lists which setups were checked against measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sapo.planning.quantized import base_weight_bytes, dequantized_bytes
from sapo.planning.setup import Setup
from sapo.planning.shape import ModelShape

GIB = 2**30

# TrainingArguments.optim -> (states per trainable element, bytes of a state element (None: the
# master weights'), whether a step makes a temporary as large as one state: foreach on CUDA, one
# parameter at a time on the CPU, one flat partition under DeepSpeed)
OPTIMIZERS = {
    "adamw_torch": (2, None, True),
    "adamw_torch_fused": (2, None, False),
    "adafactor": (1, None, False),  # factored second moments: at most one state
    "rmsprop": (1, None, True),
    "adagrad": (1, None, True),
    "sgd": (0, None, False),
    "adamw_bnb_8bit": (2, 1, False),
    "adamw_8bit": (2, 1, False),
    "paged_adamw_8bit": (2, 1, False),
    "lion_8bit": (1, 1, False),
}
# bytes per token and decoder layer (per hidden unit, per MLP unit) that autograd keeps, by the
# precision the layer computes in and what trains (LoRA on the MLP too, or on attention only)
ACTIVATIONS = {
    ("float32", "full"): (40, 16),
    ("float32", "lora-all"): (32, 16),
    ("float32", "lora-attention"): (28, 12),
    ("autocast", "full"): (34, 8),  # float32 weights, bfloat16 autocast
    ("autocast", "lora-all"): (28, 8),
    ("autocast", "lora-attention"): (20, 6),
    ("bfloat16", "full"): (24, 8),  # every weight bfloat16, no autocast (DeepSpeed's bf16)
    ("bfloat16", "lora-all"): (20, 8),
    ("bfloat16", "lora-attention"): (18, 6),
    ("bfloat16-autocast", "full"): (24, 8),  # bfloat16 weights (FSDP2's copies, a LoRA base), autocast
    ("bfloat16-autocast", "lora-all"): (28, 8),
    ("bfloat16-autocast", "lora-attention"): (20, 6),
}
MLP_LAYERS = frozenset({"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3"})
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # reduce_bucket_size default, elements
DEEPSPEED_MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters default
DEEPSPEED_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold default
CUDA_RUNTIME = GIB  # CUDA context, kernels, communication buffers
FITS_UNDER = 0.9  # a plan fits when its peak stays under this share of a device's memory


@dataclass
class MemoryPlan:
    """Bytes per device: ``parts`` by what holds them, ``phases`` by when; the peak is the largest phase."""

    parts: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)  # with and without checkpointing

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


@dataclass(frozen=True)
class _Counts:
    """The numbers every part is made of."""

    n: int  # devices the weights are split over
    base: int  # the model's parameters
    adapter: int  # one LoRA adapter's (0 without LoRA)
    trainable: int
    weight: int  # bytes of a weight as loaded
    compute: int  # bytes of a weight as the forward reads it
    engine: int  # bytes of a weight in DeepSpeed's module (it casts the module to the compute dtype)
    master: int  # bytes of a weight the optimizer steps
    regime: str

    @classmethod
    def of(cls, shape: ModelShape, setup: Setup) -> _Counts:
        lora = setup.lora_rank is not None
        adapter = shape.lora_parameters(setup.lora_rank, setup.lora_targets) if lora else 0
        deepspeed = setup.distributed in ("zero2", "zero3")
        compute = 2 if setup.mixed_precision else setup.weight_bytes
        if deepspeed or setup.distributed == "fsdp2":
            master = 4 if setup.mixed_precision or deepspeed else setup.weight_bytes
        else:
            master = 4 if lora else setup.weight_bytes  # PEFT keeps adapters in float32
        if deepspeed and setup.mixed_precision:
            regime = "bfloat16"
        elif setup.mixed_precision is None:
            regime = "float32" if setup.weight_bytes == 4 else "bfloat16"
        elif setup.distributed == "fsdp2" or setup.weight_bytes == 2:
            regime = "bfloat16-autocast"
        else:
            regime = "autocast"
        return cls(
            n=setup.num_devices,
            base=shape.parameters,
            adapter=adapter,
            trainable=adapter if lora else shape.parameters,
            weight=setup.weight_bytes,
            compute=compute,
            engine=compute if deepspeed else setup.weight_bytes,
            master=master,
            regime=regime,
        )


def _resident(shape: ModelShape, setup: Setup, c: _Counts) -> dict[str, int]:
    """Weights, masters, optimizer state, EMA, reference and buffers that live through a step."""
    lora, dpo, n = setup.lora_rank is not None, setup.loss_type == "dpo", c.n
    states, state_bytes, _ = OPTIMIZERS.get(setup.optimizer, OPTIMIZERS["adamw_torch"])
    sharded_states = n if setup.distributed in ("zero2", "zero3", "fsdp2") else 1
    parts = {"optimizer state": states * (state_bytes or c.master) * c.trainable // sharded_states}
    if setup.distributed in ("single", "ddp"):
        base = base_weight_bytes(shape, c.weight, setup.quantized_bits, setup.nested_quantization)
        parts["policy weights"] = base + 4 * c.adapter
        parts["EMA (float32)"] = 8 * c.adapter if lora else 4 * c.base * setup.ema_on_device
        parts["reference"] = dpo * (4 * c.adapter if lora else c.weight * c.base)
        if setup.distributed == "ddp":  # DDP's gradient buckets: one more copy of the gradients
            parts["gradient buffers"] = c.master * c.trainable
    elif setup.distributed == "zero2":
        parts["policy weights"] = c.engine * (c.base + c.adapter)
        parts["float32 master weights"] = 4 * c.trainable // n
        parts["EMA (float32)"] = (c.engine + 4) * c.adapter if lora else 4 * c.base * setup.ema_on_device
        parts["reference"] = dpo * (
            c.engine * c.adapter if lora else c.weight * c.base
        )  # copied before the cast
        parts["gradient buffers"] = c.engine * min(DEEPSPEED_REDUCE_BUCKET, c.trainable)
    elif setup.distributed == "zero3":
        persistent = sum(size for size in shape.parameter_sizes if size < DEEPSPEED_PERSISTENCE_THRESHOLD)
        parts["policy weights"] = c.engine * ((c.base + c.adapter) // n + persistent * (n - 1) // n)
        parts["float32 master weights"] = 4 * c.trainable // n
        if lora:  # the EMA and reference adapters are partitioned with the model; the average is whole
            parts["EMA (float32)"] = c.engine * c.adapter // n + 4 * c.adapter
            parts["reference"] = dpo * c.engine * c.adapter // n
        else:  # a float32 average, and its copy in the compute dtype that sampling gathers
            parts["EMA (float32)"] = 4 * c.base // n + (c.engine * c.base // n if c.engine < 4 else 0)
            parts["reference"] = dpo * c.engine * c.base // n
        parts["gradients"] = c.engine * c.trainable // n  # DeepSpeed's flat buffer, allocated up front
        parts["gradient buffers"] = c.engine * min(DEEPSPEED_REDUCE_BUCKET, c.trainable)
    else:  # fsdp2: accelerate upcasts the trainable weights to float32 under mixed precision
        frozen = c.base if lora else 0
        parts["policy weights"] = (c.master * c.trainable + c.weight * frozen) // n
        parts["EMA (float32)"] = 4 * c.adapter * (1 + 1 / n) if lora else 4 * c.base / n
        parts["reference"] = dpo * (4 * c.adapter if lora else c.master * c.base) // n
    if setup.device == "cuda":
        parts["CUDA runtime"] = CUDA_RUNTIME
    return {name: int(value) for name, value in parts.items()}


def _forward_weights(shape: ModelShape, setup: Setup, c: _Counts) -> tuple[int, int]:
    """Weights a forward needs besides the resident ones, gathered (ZeRO-3, FSDP2) or cast
    (autocast): (at its start, kept while the activations build up and the backward runs).

    ZeRO-3 prefetches up to ``stage3_max_live_parameters`` at a forward's start and holds them
    beside the all-gather buffers they are copied from; for full fine-tuning it keeps them until
    the backward, with LoRA it releases each layer after use (measured on CPU processes).
    """
    if setup.quantized_bits is not None:  # one weight matrix dequantized at a time
        dequantized = dequantized_bytes(shape, c.weight)
        return dequantized, dequantized
    root = c.base - shape.num_layers * shape.layer_parameters  # embeddings, head, final norm
    if setup.distributed == "zero3":
        start = 2 * c.engine * min(c.base, DEEPSPEED_MAX_LIVE_PARAMETERS)
        return start, start if setup.lora_rank is None else c.engine * (root + shape.layer_parameters)
    if setup.distributed == "fsdp2":  # accelerate's root unit, this and the next layer
        kept = c.compute * (root + 2 * shape.layer_parameters)
        return kept, kept
    if c.regime == "autocast":  # autocast's bfloat16 copies of the float32 linear weights
        return 2 * shape.linear_parameters, 2 * shape.linear_parameters
    return 0, 0


def trained_kind(shape: ModelShape, lora_rank: int | None, lora_targets) -> str:
    """``"full"``, or LoRA on the MLP too (``"lora-all"``) or on attention only (``"lora-attention"``)."""
    if lora_rank is None:
        return "full"
    names = {layer.name.split(".")[-1] for layer in shape.lora_targets(lora_targets)}
    return "lora-all" if names & MLP_LAYERS else "lora-attention"


def layer_activation_bytes(
    shape: ModelShape, regime: str, width: int, lora_rank: int | None = None, lora_targets=None
) -> float:
    """Bytes autograd keeps per token of a decoder layer computing in ``regime`` (a key of
    :data:`ACTIVATIONS`), for rows ``width`` tokens wide under SAPO's 4D mask."""
    per_hidden, per_mlp = ACTIVATIONS[(regime, trained_kind(shape, lora_rank, lora_targets))]
    half = regime != "float32"  # the layer computes in 16 bits
    per_layer = per_hidden * shape.hidden_size + per_mlp * shape.intermediate_size
    per_layer += 4 * shape.num_attention_heads + 8  # the attention's and the norms' statistics
    per_layer += 2 * width if half else 0  # sdpa's copy of the mask in the compute dtype
    if lora_rank is not None:  # each adapter's rank-wide intermediate
        targets = len(shape.lora_targets(lora_targets)) / shape.num_layers
        per_layer += targets * lora_rank * (2 if half else 4)
    return per_layer


def _activation_bytes(shape: ModelShape, setup: Setup, c: _Counts) -> tuple[int, int, int]:
    """(kept with gradient checkpointing, kept without, one layer's) for one training batch; with
    checkpointing, each layer keeps its input and the backward recomputes one layer at a time."""
    width, rows = _batch(setup)
    tokens = rows * width
    layer = int(tokens * layer_activation_bytes(shape, c.regime, width, setup.lora_rank, setup.lora_targets))
    checkpoint = (2 if c.regime.startswith("bfloat16") else 4) * shape.hidden_size
    mask = rows * width * width * (4 if c.regime == "float32" else 1)
    outside = tokens * 8 * shape.hidden_size + mask  # the final norm, the mask
    return tokens * shape.num_layers * checkpoint + layer + outside, shape.num_layers * layer + outside, layer


def _batch(setup: Setup) -> tuple[int, int]:
    """(width, rows) of a training batch: packed pairs, or chosen and rejected padded rows."""
    if setup.packed:
        return setup.sequence_tokens + setup.answer_tokens, setup.pairs_per_step
    return setup.sequence_tokens, 2 * setup.pairs_per_step


def _logit_bytes(shape: ModelShape, setup: Setup, c: _Counts, training: bool) -> int:
    """The LM head's outputs for the scored positions (and, training, their gradient)."""
    scored = 2 * setup.pairs_per_step * (setup.answer_tokens if setup.packed else setup.sequence_tokens - 1)
    vocab, hidden = shape.vocab_size, shape.hidden_size
    logit = 4 if c.regime == "float32" else 2
    if setup.logit_chunk:  # one chunk's logits (and float32 copy) at a time, forward and backward
        rows = min(setup.logit_chunk, scored)
        total = rows * vocab * (logit + 4) * (2 if training else 1) + scored * hidden * logit
        if training and setup.lora_rank is None:  # the head's gradient, accumulated in float32
            total += 4 * vocab * hidden * (2 if logit == 2 else 1)
        return total
    pair_softmax = 4 * scored // setup.pairs_per_step * vocab  # one pair's float32 normaliser
    copies = 1 if not training else (2 if logit == 4 or setup.device == "cuda" else 3)
    return copies * logit * scored * vocab + pair_softmax


def _sampling(shape: ModelShape, setup: Setup, c: _Counts) -> tuple[int, int]:
    """(the EMA gathered whole for sampling, KV cache plus one layer's prefill)."""
    lora = setup.lora_rank is not None
    if setup.distributed == "zero3":
        gathered = c.engine * (c.base + (3 if setup.loss_type == "dpo" else 2) * c.adapter)
    elif setup.distributed == "fsdp2":  # whole with full weights; a LoRA model decodes unit by unit
        gathered = _forward_weights(shape, setup, c)[1] if lora else c.compute * c.base
    else:
        gathered = 0
    sample = c.compute if setup.distributed != "zero2" or setup.mixed_precision else c.weight
    rows, length = setup.rows_per_generation, setup.sequence_tokens
    prefix = length - min(setup.segment_length, setup.answer_tokens)
    kv_cache = rows * length * shape.num_layers * 2 * shape.key_value_size * sample
    prefill = rows * prefix * (shape.hidden_size + 3 * shape.intermediate_size) * sample
    prefill += rows * prefix * prefix * (1 if sample == 2 else 5) + rows * shape.vocab_size * 12
    if setup.quantized_bits is not None:
        prefill += dequantized_bytes(shape, c.weight)
    return gathered, kv_cache + prefill


def _step_temporaries(shape: ModelShape, setup: Setup, c: _Counts) -> int:
    """What an optimizer step allocates besides the gradients and its states."""
    _, state_bytes, temporary = OPTIMIZERS.get(setup.optimizer, OPTIMIZERS["adamw_torch"])
    if setup.distributed in ("zero2", "zero3"):  # float32 gradients of the flat partition
        return 4 * c.trainable // c.n * (2 if temporary else 1)
    if not temporary:
        return 0
    if setup.device == "cuda":  # foreach: one temporary per parameter, all at once
        elements = c.trainable // (c.n if setup.distributed == "fsdp2" else 1)
    elif setup.lora_rank is not None:
        elements = (
            max(layer.in_features for layer in shape.lora_targets(setup.lora_targets)) * setup.lora_rank
        )
    else:
        elements = max(shape.parameter_sizes)
    return (state_bytes or c.master) * elements


# when each part is alive: "resident" through the whole step, else only in that phase
PART_PHASES = {
    "policy weights": "resident",
    "float32 master weights": "resident",
    "optimizer state": "resident",
    "EMA (float32)": "resident",
    "reference": "resident",
    "gradient buffers": "resident",
    "CUDA runtime": "resident",
    "gradients": "training pass, optimizer step",
    "weights gathered or cast for the forward": "training pass",
    "activations": "training pass",
    "logits": "training pass",
    "EMA gathered for sampling": "sampling",
    "generation KV cache and prefill": "sampling",
    "reference logits and layer": "reference pass",
    "optimizer step temporaries": "optimizer step",
}


def plan_memory(shape: ModelShape, setup: Setup) -> MemoryPlan:
    """Bytes per device of ``setup`` for a model of ``shape``, by part and by phase."""
    c = _Counts.of(shape, setup)
    resident_parts = _resident(shape, setup, c)
    resident = sum(resident_parts.values())
    forward_start, forward = _forward_weights(shape, setup, c)
    checkpointed, saved, layer = _activation_bytes(shape, setup, c)
    activations = checkpointed if setup.gradient_checkpointing else saved
    logits = _logit_bytes(shape, setup, c, training=True)
    gathered, generation = _sampling(shape, setup, c)
    if setup.distributed == "zero3":  # DeepSpeed's flat gradient buffer: resident
        gradients = 0
    elif setup.distributed in ("zero2", "fsdp2"):  # reduced into this device's partition
        gradients = (c.engine if setup.distributed == "zero2" else c.master) * c.trainable // c.n
    else:
        gradients = c.master * c.trainable
    step = _step_temporaries(shape, setup, c)
    # a training pass: the weights gathered at the forward's start, the activations and logits at
    # the start of the backward (with the head's gradient, the first to arrive), or every gradient
    # at its end beside the first layer's activations (recomputed, with checkpointing), whichever
    # is more; with gradient accumulation the earlier micro-batches' gradients are there throughout
    head_gradient = (
        0
        if setup.lora_rank is not None or setup.logit_chunk
        else c.master * shape.vocab_size * shape.hidden_size
    )
    backward = forward + activations + logits
    if setup.gradient_accumulation_steps > 1:
        training = max(forward_start + gradients, backward + gradients)
    else:
        training = max(forward_start, backward + min(head_gradient, gradients), forward + gradients + layer)
    phases = {
        "sampling": resident + gathered + generation,
        "training pass": resident + training,
        "optimizer step": resident + gradients + step,
    }
    reference = 0
    if setup.loss_type == "dpo":  # inference: the logits and one layer's work at a time
        reference = _logit_bytes(shape, setup, c, training=False)
        width, rows = _batch(setup)
        reference += rows * width * (shape.hidden_size + 3 * shape.intermediate_size) * c.compute
        sharded = setup.distributed in ("zero3", "fsdp2")
        phases["reference pass"] = resident + (forward_start if sharded else 0) + reference
    parts = {name: 0 for name in PART_PHASES}
    parts.update(resident_parts)
    parts.update({
        "gradients": resident_parts.get("gradients", 0) + gradients,
        "weights gathered or cast for the forward": max(forward_start, forward),
        "activations": activations,
        "logits": logits,
        "EMA gathered for sampling": gathered,
        "generation KV cache and prefill": generation,
        "reference logits and layer": reference,
        "optimizer step temporaries": step,
    })  # fmt: skip
    return MemoryPlan(parts, phases, {"with checkpointing": checkpointed, "without checkpointing": saved})
