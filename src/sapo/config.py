"""``SAPOConfig``: every knob of a SAPO run, documented where it is declared."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

LOSS_TYPES = ("dpo", "orpo")
GENERATION_BACKENDS = ("auto", "transformers")


@dataclass
class SAPOConfig(TrainingArguments):
    r"""
    Configuration of [`SAPOTrainer`]: Self-Augmented Preference Optimization (arXiv 2405.20830).

    Only SAPO's own fields are listed; every [`~transformers.TrainingArguments`] field is accepted
    too. Turned into command-line flags by [`~transformers.HfArgumentParser`].

    Parameters:
        > Parameters that control the model

        model_init_kwargs (`dict[str, Any]`, *optional*):
            Keyword arguments for `AutoModelForCausalLM.from_pretrained`, used when `model` is given
            to the trainer as a model id or path.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Whether to disable dropout in the policy, the EMA model and the reference model.

        > Parameters that control the data preprocessing

        max_length (`int` or `None`, *optional*, defaults to `2048`):
            Most tokens of prompt plus answer. Gold answers are cut to fit (their start is kept).
        max_prompt_length (`int` or `None`, *optional*, defaults to `1792`):
            Most prompt tokens. Rows with a longer prompt are dropped, with one warning that counts
            them. Must be smaller than `max_length`.
        dataset_num_proc (`int`, *optional*):
            Number of processes used to tokenize the dataset.

        > Parameters that control the preference loss

        loss_type (`str`, *optional*, defaults to `"dpo"`):
            `"dpo"`: sigmoid DPO against a reference model refreshed from the EMA model.
            `"orpo"`: ORPO's NLL plus odds-ratio term; no reference model is built.
        beta (`float`, *optional*, defaults to `0.1`):
            DPO's β (paper: 0.1), or ORPO's λ weighting the odds-ratio term (paper: 0.05).

        > Parameters that control SAPO's negatives

        segment_length (`int`, *optional*, defaults to `256`):
            Tokens of the gold answer the EMA model rewrites (`L` in the paper). Answers no longer
            than this are regenerated whole.
        temperature (`float`, *optional*, defaults to `0.7`):
            Sampling temperature of segment generation; must be positive.
        top_p (`float`, *optional*, defaults to `0.95`):
            Nucleus sampling threshold of segment generation, in (0, 1].
        top_k (`int`, *optional*, defaults to `50`):
            Top-k filter of segment generation; 0 disables it.
        sample_every_n_steps (`int`, *optional*, defaults to `1`):
            Generate segments every this many optimizer steps. Rows that arrive in between are
            kept and generated for at the next generation step, so no row is skipped.
        generation_num_threads (`int`, *optional*):
            CPU only: torch's intra-op threads while sampling segments (restored afterwards);
            `None` leaves torch's setting. A decode step of a small model is many tiny matrix
            products, so `1` is often fastest, by far on a busy machine (docs/performance.md).
        generation_backend (`str`, *optional*, defaults to `"auto"`):
            `"auto"`: SAPO's sampling loop (`sapo.decoding`), which prepares attention masks once per
            call and draws the same tokens as `generate` for the same seed, where the model allows
            it (`sdpa` or `eager` attention, no window shorter than the sequences, not under
            ZeRO-3 or FSDP); transformers' `generate` elsewhere. `"transformers"`: always
            `generate`, which also applies the model's own `generation_config` (e.g. a repetition
            penalty).

        > Parameters that control the EMA model, the replay buffer and the reference model

        ema_decay (`float`, *optional*, defaults to `0.5`):
            Weight of the OLD average in `ema = ema_decay * ema + (1 - ema_decay) * policy`, in
            [0, 1) (paper: 0.5). TRL's `ref_model_mixup_alpha` weights the new policy instead.
        ema_update_interval (`int`, *optional*, defaults to `1`):
            Update the EMA model every this many optimizer steps.
        ema_device (`str`, *optional*):
            Device of the float32 EMA model; defaults to the policy's. `"cpu"` keeps it off the
            accelerator for large models (generation then runs on the CPU). Does not apply under
            FSDP2 or DeepSpeed ZeRO-3, where the EMA is sharded like the policy, nor with LoRA.
        replay_buffer_size (`int`, *optional*, defaults to `2000`):
            Capacity of the per-device FIFO replay buffer (paper: 2000). Must hold at least one
            batch.
        ref_model_sync_steps (`int`, *optional*):
            DPO only: copy the EMA weights into the reference every this many optimizer steps.
            `None` syncs once per epoch.

    > [!NOTE]
    > Defaults that differ from [`~transformers.TrainingArguments`]: `logging_steps=10` and
    > `remove_unused_columns=False` (the trainer builds its batches from the replay buffer).
    """

    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when `model` is an id."
        },
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Whether to disable dropout in the policy, EMA and reference models."}
    )
    max_length: int | None = field(
        default=2048, metadata={"help": "Most tokens of prompt plus answer; gold answers are cut to fit."}
    )
    max_prompt_length: int | None = field(
        default=1792,
        metadata={"help": "Most prompt tokens; rows with longer prompts are dropped with a warning."},
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Number of processes used to tokenize the dataset."}
    )
    loss_type: str = field(
        default="dpo",
        metadata={"help": "Preference loss: 'dpo' (with a reference model) or 'orpo' (without)."},
    )
    beta: float = field(
        default=0.1, metadata={"help": "DPO's beta, or ORPO's lambda on the odds-ratio term."}
    )
    segment_length: int = field(
        default=256, metadata={"help": "Tokens of the gold answer the EMA model rewrites."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of segment generation."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling threshold of segment generation."})
    top_k: int = field(default=50, metadata={"help": "Top-k filter of segment generation; 0 disables it."})
    sample_every_n_steps: int = field(
        default=1, metadata={"help": "Generate segments every this many optimizer steps; no row is skipped."}
    )
    generation_num_threads: int | None = field(
        default=None, metadata={"help": "CPU only: torch threads while sampling segments; None: unchanged."}
    )
    generation_backend: str = field(
        default="auto",
        metadata={"help": "'auto': SAPO's sampling loop where the model allows it; 'transformers'."},
    )
    ema_decay: float = field(
        default=0.5, metadata={"help": "Weight of the old average: ema = d * ema + (1 - d) * policy."}
    )
    ema_update_interval: int = field(
        default=1, metadata={"help": "Update the EMA model every this many optimizer steps."}
    )
    ema_device: str | None = field(
        default=None, metadata={"help": "Device of the float32 EMA model; defaults to the policy's device."}
    )
    replay_buffer_size: int = field(
        default=2000, metadata={"help": "Capacity of the per-device replay buffer."}
    )
    ref_model_sync_steps: int | None = field(
        default=None,
        metadata={"help": "DPO: copy the EMA into the reference every this many steps; None: per epoch."},
    )

    logging_steps: float = field(default=10, metadata={"help": "Log every this many optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: SAPO builds its batches itself."}
    )

    def __post_init__(self):
        self._validate()
        super().__post_init__()

    def _validate(self) -> None:
        def fail(name: str, requirement: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r}: {requirement}")

        if self.loss_type not in LOSS_TYPES:
            fail("loss_type", f"must be one of {', '.join(LOSS_TYPES)}")
        if self.beta <= 0:
            fail("beta", "must be positive")
        if self.segment_length <= 0:
            fail("segment_length", "must be a positive number of tokens")
        if not 0.0 <= self.ema_decay < 1.0:
            fail("ema_decay", "must be in [0, 1)")
        for name in ("ema_update_interval", "sample_every_n_steps"):
            if getattr(self, name) <= 0:
                fail(name, "must be a positive number of optimizer steps")
        if self.ref_model_sync_steps is not None and self.ref_model_sync_steps <= 0:
            fail(
                "ref_model_sync_steps",
                "must be a positive number of optimizer steps, or None for once per epoch",
            )
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                fail(name, "must be at least 1")
        if self.learning_rate < 0:
            fail("learning_rate", "must be >= 0")
        if self.generation_num_threads is not None and self.generation_num_threads < 1:
            fail("generation_num_threads", "must be at least 1, or None to leave torch's setting")
        if self.generation_backend not in GENERATION_BACKENDS:
            fail("generation_backend", f"must be one of {', '.join(GENERATION_BACKENDS)}")
        if self.replay_buffer_size < self.per_device_train_batch_size:
            fail(
                "replay_buffer_size",
                f"must hold at least one batch ({self.per_device_train_batch_size} pairs)",
            )
        if self.temperature <= 0:
            fail("temperature", "must be positive")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            fail("top_k", "must be >= 0 (0 disables it)")
        if self.max_length is not None and self.max_length <= 1:
            fail("max_length", "must be at least 2 tokens")
        if self.max_prompt_length is not None and self.max_prompt_length <= 0:
            fail("max_prompt_length", "must be positive")
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            fail("max_prompt_length", f"must be smaller than max_length ({self.max_length})")
