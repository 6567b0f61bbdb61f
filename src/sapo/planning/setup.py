"""What a memory plan is computed for: one run's placement, precision, optimizer, batch and lengths."""

from __future__ import annotations

from dataclasses import dataclass

from sapo.planning.shape import ModelShape

DISTRIBUTED = ("single", "ddp", "zero2", "zero3", "fsdp2")
QUANTIZED_PLACEMENTS = ("single", "ddp")


@dataclass(frozen=True)
class Setup:
    """One run's placement and sizes (``sapo plan`` reads them from a recipe).

    Lengths are the longest batch's: ``sequence_tokens`` (prompt + gold answer) and
    ``answer_tokens``; a packed pair is at most ``sequence_tokens + answer_tokens`` wide (the
    rejected tail as long as the gold one) and has ``2 * answer_tokens`` scored positions.
    ``logit_chunk``: positions per chunk of the LM head (``sapo.logprobs``), ``None`` for whole logits.
    ``quantized_bits``: 4 or 8 when the base is loaded quantized by bitsandbytes (QLoRA), planned
    on one device or under DDP (:mod:`sapo.planning.quantized`).
    """

    distributed: str = "single"
    num_devices: int = 1
    weight_bytes: int = 4  # of the weights as loaded
    mixed_precision: str | None = "bf16"  # None: compute in the weights' dtype
    optimizer: str = "adamw_torch"
    lora_rank: int | None = None
    lora_targets: str | tuple[str, ...] | None = None
    quantized_bits: int | None = None
    nested_quantization: bool = False
    loss_type: str = "dpo"
    gradient_checkpointing: bool = True
    pairs_per_step: int = 8
    rows_per_generation: int = 8
    gradient_accumulation_steps: int = 1
    sequence_tokens: int = 2048
    answer_tokens: int = 2047
    segment_length: int = 256
    packed: bool = True
    logit_chunk: int | None = None
    ema_on_device: bool = True
    device: str = "cuda"

    def __post_init__(self):
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"distributed={self.distributed!r}: must be one of {', '.join(DISTRIBUTED)}")
        if self.num_devices < 1 or (self.distributed == "single" and self.num_devices != 1):
            raise ValueError(
                f"num_gpus={self.num_devices}: 'single' runs on one device, the others on one or more"
            )
        if not 0 < self.answer_tokens < self.sequence_tokens:
            raise ValueError(f"answer_tokens={self.answer_tokens}: must be in [1, sequence_tokens)")
        if self.quantized_bits is not None:
            if self.lora_rank is None:
                raise ValueError(f"load_in_{self.quantized_bits}bit: a quantized base trains LoRA only")
            if self.distributed not in QUANTIZED_PLACEMENTS:
                raise ValueError(
                    f"distributed={self.distributed!r}: a quantized base is planned on one device or "
                    "under DDP (single, ddp)"
                )

    @classmethod
    def of_run(
        cls,
        args,
        shape: ModelShape,
        *,
        distributed: str,
        num_devices: int,
        weight_bytes: int,
        lora_rank: int | None = None,
        lora_targets: str | tuple[str, ...] | None = None,
        quantized_bits: int | None = None,
        nested_quantization: bool = False,
        sequence_tokens: int | None = None,
        answer_tokens: int | None = None,
        device: str = "cuda",
    ) -> Setup:
        """The setup of a run of ``args`` (a ``SAPOConfig``) with a model of ``shape``. Lengths
        default to the longest the config admits: ``max_length`` tokens, all but one of them answer."""
        sharded = distributed in ("zero3", "fsdp2")
        return cls(
            distributed=distributed,
            num_devices=1 if distributed == "single" else num_devices,
            weight_bytes=weight_bytes,
            mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else None,
            optimizer=str(getattr(args.optim, "value", args.optim)),
            lora_rank=lora_rank,
            lora_targets=lora_targets,
            quantized_bits=quantized_bits,
            nested_quantization=nested_quantization,
            loss_type=args.loss_type,
            gradient_checkpointing=args.gradient_checkpointing,
            pairs_per_step=args.per_device_train_batch_size,
            rows_per_generation=(
                args.per_device_train_batch_size
                * args.gradient_accumulation_steps
                * args.sample_every_n_steps
            ),
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            sequence_tokens=sequence_tokens or args.max_length,
            answer_tokens=answer_tokens or args.max_length - 1,
            segment_length=args.segment_length,
            packed=args.pair_scoring != "padded" and shape.packs_pairs,
            logit_chunk=None if sharded or not shape.chunked_head else (args.logprob_chunk_size or None),
            ema_on_device=args.ema_device != "cpu",
            device=device,
        )
