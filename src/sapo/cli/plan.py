"""``sapo plan``: the memory a recipe needs on each device, from the model's ``config.json`` alone.

    sapo plan --config recipes/llama-3-8b/sapo-dpo.yaml [--num_gpus N] [--gpu_memory_gb G]
              [--distributed single|ddp|zero2|zero3|fsdp2] [--field value ...]

It reads the recipe as ``sapo train`` does (every field, flags overriding the file), plus the
hardware fields of :class:`PlanningArguments`, builds the model on the meta device (no weights,
no download: a local ``config.json``, a folder holding one, a cached Hub id or a built-in model)
and prints a table per device (:mod:`sapo.planning`), the same run's peak under each other
placement, and, as its last line, one JSON object with ``per_device_gb`` and ``fits``.
Lengths are the longest the recipe admits (``max_length`` tokens, nearly all of them answer):
a plan that fits holds for every batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

GB_NOTE = "GB here are GiB (2**30 bytes)"


@dataclass
class PlanningArguments:
    r"""
    The hardware a recipe is meant for. Planning only: `sapo plan` reads these fields; `sapo train`
    accepts and ignores them (where a run goes is the launcher's choice, e.g. `accelerate launch
    --config_file recipes/accelerate/zero3.yaml`).

    Parameters:
        num_gpus (`int`, *optional*, defaults to `1`):
            Devices the run is spread over.
        gpu_memory_gb (`float`, *optional*, defaults to `80`):
            Memory of one device, in GiB.
        distributed (`str`, *optional*):
            How the run is placed: `single` (one device), `ddp`, `zero2`, `zero3` (DeepSpeed) or
            `fsdp2`; by default `single` on one device and `ddp` on several.
        model_config (`str`, *optional*):
            Where the model's `config.json` is (a file, a folder holding one, a cached Hub id, a
            built-in model), when `model_name_or_path` cannot be read offline (e.g. a model that an
            earlier stage writes). A relative path is looked up from the current folder, then from
            the recipe's folder and its parents.
    """

    num_gpus: int = field(default=1, metadata={"help": "Planning only: devices the run is spread over."})
    gpu_memory_gb: float = field(default=80.0, metadata={"help": "Planning only: memory of one device, GiB."})
    distributed: Literal["single", "ddp", "zero2", "zero3", "fsdp2"] | None = field(
        default=None, metadata={"help": "Planning only: single, ddp, zero2, zero3 or fsdp2."}
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": "Planning only: the model's config.json, if the model is not at hand."},
    )

    def __post_init__(self):
        if self.num_gpus < 1:
            raise ValueError(f"num_gpus={self.num_gpus}: must be at least 1")
        if self.gpu_memory_gb <= 0:
            raise ValueError(f"gpu_memory_gb={self.gpu_memory_gb}: must be positive")
        if self.distributed == "single" and self.num_gpus != 1:
            raise ValueError(f"distributed='single' runs on one device, not num_gpus={self.num_gpus}")

    def placement(self) -> str:
        return self.distributed or ("single" if self.num_gpus == 1 else "ddp")


def _found(path: str, recipe: str | None) -> str:
    """``path`` as given, or (relative and missing) under the recipe's folder or one of its parents."""
    if Path(path).is_absolute() or Path(path).exists() or recipe is None:
        return path
    for folder in Path(recipe).resolve().parents:
        if (folder / path).exists():
            return str(folder / path)
    return path


def _weight_bytes(torch_dtype: str | None, config_dtype) -> int:
    """Bytes of a weight as ``from_pretrained`` loads it (``None``/``auto``: the config's dtype)."""
    import torch

    if torch_dtype in (None, "auto"):
        return 4 if config_dtype in (None, torch.float32) else 2
    return 4 if torch_dtype == "float32" else 2


def prepare_plan(argv: Sequence[str], recipe_arguments: Callable[[], tuple[type, ...]]) -> Callable[[], None]:
    """Read the recipe with ``recipe_arguments()`` (the dataclasses of `sapo train`, this module's
    :class:`PlanningArguments` among them) and plan it; the returned callable prints the plan."""
    from sapo.cli.arguments import ArgumentParser, ModelArguments
    from sapo.cli.loading import check_revision, loading_error
    from sapo.config import SAPOConfig
    from sapo.planning import DISTRIBUTED, Setup, load_model_config, model_shape, plan_memory
    from sapo.planning.setup import QUANTIZED_PLACEMENTS

    # use_cpu: TrainingArguments would refuse bf16 on a machine without a GPU; nothing runs here
    parser = ArgumentParser(recipe_arguments(), "sapo plan", use_cpu=True)
    for action in parser._actions:  # the data is not read: a recipe may name it or not
        if action.dest == "dataset_name":
            action.required = False
    parsed = {type(instance): instance for instance in parser.parse(argv)}
    config, model_args, hardware = parsed[SAPOConfig], parsed[ModelArguments], parsed[PlanningArguments]
    recipe = argv[list(argv).index("--config") + 1] if "--config" in argv else None
    check_revision(model_args)
    name = _found(hardware.model_config or model_args.model_name_or_path, recipe)
    trusted = model_args.trust_remote_code
    try:
        model_config = load_model_config(name, model_args.model_revision, trust_remote_code=trusted)
    except ValueError as error:
        if "trust_remote_code" in str(error):  # the same one line as `sapo train` prints
            raise loading_error("config", name, error) from error
        raise
    shape = model_shape(
        model_config, name, model_args.attn_implementation, config.max_length, trust_remote_code=trusted
    )
    targets = model_args.lora_target_modules
    targets = "all-linear" if targets == ["all-linear"] else (tuple(targets) if targets else None)
    common = dict(
        weight_bytes=_weight_bytes(model_args.torch_dtype, shape.config_dtype),
        lora_rank=model_args.lora_r if model_args.use_peft else None,
        lora_targets=targets,
        quantized_bits=model_args.quantized_bits,
        nested_quantization=model_args.use_bnb_nested_quant,
    )
    placement = hardware.placement()
    setup = Setup.of_run(config, shape, distributed=placement, num_devices=hardware.num_gpus, **common)
    plan = plan_memory(shape, setup)
    devices = max(hardware.num_gpus, 2)  # the other placements, on this many devices (but single)
    others = {}
    for option in QUANTIZED_PLACEMENTS if model_args.quantized_bits else DISTRIBUTED:
        other = Setup.of_run(config, shape, distributed=option, num_devices=devices, **common)
        others[option] = plan_memory(shape, other)

    def run() -> None:
        print(plan_table(shape, setup, plan, hardware, others, devices, recipe))
        print(json.dumps(plan_record(shape, setup, plan, hardware, others, recipe)))

    return run


def plan_record(shape, setup, plan, hardware, others, recipe) -> dict:
    """The JSON line: ``per_device_gb``, ``fits`` and what they are made of."""
    from sapo.planning import GIB
    from sapo.planning.memory import FITS_UNDER

    def gb(value: float) -> float:
        return round(value / GIB, 2)

    return {
        "recipe": recipe,
        "model": shape.name,
        "parameters": shape.parameters,
        "distributed": setup.distributed,
        "quantized_bits": setup.quantized_bits,
        "num_gpus": setup.num_devices,
        "gpu_memory_gb": hardware.gpu_memory_gb,
        "per_device_gb": gb(plan.peak),
        "fits": plan.peak <= FITS_UNDER * hardware.gpu_memory_gb * GIB,
        "peak_phase": plan.peak_phase,
        "phases_gb": {name: gb(value) for name, value in plan.phases.items()},
        "parts_gb": {name: gb(value) for name, value in plan.parts.items()},
        "activations_gb": {name: gb(value) for name, value in plan.activations.items()},
        "other_placements_gb": {name: gb(other.peak) for name, other in others.items()},
    }


def plan_table(shape, setup, plan, hardware, others, devices, recipe) -> str:
    """The per-device table ``sapo plan`` prints."""
    from sapo.planning import GIB
    from sapo.planning.memory import FITS_UNDER, OPTIMIZERS, PART_PHASES

    what = f"LoRA r={setup.lora_rank}" if setup.lora_rank else "full fine-tuning"
    if setup.quantized_bits:
        what = f"QLoRA r={setup.lora_rank} on a {setup.quantized_bits}-bit base"
    where = {"single": "one device", "ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3",
             "fsdp2": "FSDP2"}[setup.distributed]  # fmt: skip
    width = setup.sequence_tokens + setup.answer_tokens if setup.packed else setup.sequence_tokens
    lines = [
        f"{recipe or 'sapo plan'}: {shape.name} ({shape.architecture}, {shape.parameters / 1e9:.2f}B "
        f"parameters), {what}, {setup.loss_type}, {where} on {setup.num_devices} x "
        f"{hardware.gpu_memory_gb:g} GB",
        f"batch: {setup.pairs_per_step} pairs {'packed' if setup.packed else 'padded'} {width} tokens wide "
        f"({setup.answer_tokens} of {setup.sequence_tokens} tokens answer); {setup.rows_per_generation} rows "
        f"per generation call; {GB_NOTE}",
        "",
        f"{'per device':<44} {'GB':>8}  when",
    ]
    lines += [
        f"{name:<44} {value / GIB:>8.2f}  {PART_PHASES[name]}" for name, value in plan.parts.items() if value
    ]
    lines.append("-" * 53)
    lines += [f"{'phase: ' + name:<44} {value / GIB:>8.2f}" for name, value in plan.phases.items()]
    limit = FITS_UNDER * hardware.gpu_memory_gb
    verdict = "fits" if plan.peak <= limit * GIB else "does NOT fit"
    peak = f"peak ({plan.peak_phase})"
    lines.append(f"{peak:<44} {plan.peak / GIB:>8.2f}  {verdict} under {limit:g} GB ({FITS_UNDER:.0%})")
    with_gc, without_gc = (
        plan.activations[key] / GIB for key in ("with checkpointing", "without checkpointing")
    )
    checkpointing = "on" if setup.gradient_checkpointing else "off"
    lines.append(
        f"activations: {with_gc:.2f} GB with gradient checkpointing, {without_gc:.2f} GB without "
        f"({checkpointing} in this run)"
    )
    if setup.optimizer not in OPTIMIZERS:
        lines.append(f"optim {setup.optimizer!r} is planned as AdamW: two states per trainable weight")
    summary = ", ".join(f"{name} {other.peak / GIB:.1f}" for name, other in others.items())
    lines.append(f"the same run placed otherwise ({devices} devices, single: one), peak GB: {summary}")
    return "\n".join(lines)
