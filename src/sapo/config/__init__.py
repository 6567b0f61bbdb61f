"""``SAPOConfig``: every knob of a SAPO run, documented where it is declared.

It extends :class:`~sapo.config.shared.PreferenceConfig`, what every trainer of (prompt, chosen,
rejected) pairs in sapo shares (:mod:`sapo.config.shared`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sapo.config.shared import (
    GENERATION_BACKENDS,
    GENERATION_FIELDS_DOC,
    LOSS_TYPES,
    PAIR_SCORINGS,
    SEGMENT_PLACEMENTS,
    SHARED_FIELDS_DOC,
    Checks,
    GenerationBackend,
    GenerationOptions,
    LossType,
    PairScoring,
    PreferenceConfig,
    SegmentPlacement,
    check_training_arguments,
    derived_prompt_limit,
)
from sapo.ema import check_decay

# the shared names stay importable from sapo.config, where callers have always found them
__all__ = [
    "GENERATION_BACKENDS",
    "LOSS_TYPES",
    "PAIR_SCORINGS",
    "SEGMENT_PLACEMENTS",
    "Checks",
    "GenerationBackend",
    "GenerationOptions",
    "PreferenceConfig",
    "SAPOConfig",
    "check_training_arguments",
    "derived_prompt_limit",
]


@dataclass
class SAPOConfig(PreferenceConfig, GenerationOptions):
    """
    Configuration of [`SAPOTrainer`]: Self-Augmented Preference Optimization (arXiv 2405.20830).

    Only SAPO's own fields are listed; every [`~transformers.TrainingArguments`] field is accepted
    too. Turned into command-line flags by [`~transformers.HfArgumentParser`].

    Parameters:{shared}
        loss_type (`str`, *optional*, defaults to `"dpo"`):
            `"dpo"`: sigmoid DPO against a reference model refreshed from the EMA model.
            `"orpo"`: ORPO's NLL plus odds-ratio term; no reference model is built.
        allow_low_precision_weights (`bool`, *optional*, defaults to `False`):
            Train trainable weights that are bfloat16 or float16 although nothing keeps float32
            master weights for them. Off, `SAPOTrainer` refuses them (`sapo.policy.
            check_master_precision`): steps of the paper's size round away in bfloat16. Masters
            exist under DeepSpeed ZeRO and under FSDP2 with mixed precision; LoRA adapters are
            float32 anyway. Set it for an optimizer that compensates rounding itself.
        pair_scoring (`str`, *optional*, defaults to `"auto"`):
            How a pair is laid out for the policy and the reference. `"packed"`: one row holding
            the shared prompt and gold prefix once and both tails (a 4D attention mask: `sdpa` or
            `eager` attention). `"padded"`: chosen and rejected as two right-padded rows.
            `"auto"`: packed where every model takes the mask, padded elsewhere.
        logprob_chunk_size (`int` or `None`, *optional*, defaults to `256`):
            Positions per chunk of the language-model head when pairs are scored: each chunk's
            logits are reduced to the scored tokens' log-probs and freed before the next, in the
            forward and the backward, so the full `positions x vocabulary` logits never exist.
            `0` or `None`: the model computes the logits of all scored positions at once. Used
            where the result is provably the model's own (`sapo.logprobs.chunkable_head`: common
            causal LMs with no logit soft-capping or scaling, a linear or LoRA head, not under
            FSDP or ZeRO-3); elsewhere the model's logits are used. With DPO the head skips the
            answer tokens chosen and rejected share at their start (`gold[:cut]` and any further
            common tokens), whose log-probs cancel in the DPO margin: `logps/*` and `rewards/*`
            are then sums over each answer after that shared part (`rewards/margins` and
            `rewards/accuracies` are unchanged). ORPO scores whole answers.

        > Parameters that control SAPO's negatives

        segment_length (`int`, *optional*, defaults to `256`):
            Tokens of the gold answer the EMA model rewrites (`L` in the paper). Answers no longer
            than this are regenerated whole.
        segment_placement (`str`, *optional*, defaults to `"uniform"`):
            Where the rewritten span starts. `"uniform"`: a cut drawn uniformly over the gold
            answer (the paper's rule). `"uncertain"` (sapo's extension): one teacher-forced pass
            of the EMA model over prompt and gold answer gives the probability of each gold
            token; the span starts at the first token below 1/2 (one the model more likely
            misses), else at the least likely one. Logged: `sapo/cut_position` (mean cut over
            answer length) and `sapo/placed_token_probability`.
        temperature (`float`, *optional*, defaults to `0.7`):
            Sampling temperature of segment generation; must be positive.
        top_p (`float`, *optional*, defaults to `0.95`):
            Nucleus sampling threshold of segment generation, in (0, 1].
        top_k (`int`, *optional*, defaults to `50`):
            Top-k filter of segment generation; 0 disables it.
        sample_every_n_steps (`int`, *optional*, defaults to `1`):
            Generate segments every this many optimizer steps. Rows that arrive in between are
            kept and generated for at the next generation step, so no row is skipped.
        generation_num_threads (`int`, *optional*, defaults to `1`):
            CPU only: torch's intra-op threads while sampling segments (restored afterwards);
            `None` leaves torch's setting. A decode step is many small matrix products, each split
            over the threads and waiting for whichever was descheduled: on two shared cores one
            thread sampled 4-18x faster than two (docs/performance.md); on quiet cores two can be
            up to 15% faster for small models.
        skip_tied_pairs (`bool`, *optional*, defaults to `False`):
            Keep pairs whose rewrite equals the gold answer (ties) out of the replay buffer. A tie
            has a zero margin and so no preference gradient (ORPO's NLL of the gold answer
            remains), but takes a place in a training batch.
            Ties still enter an empty buffer, which must hold something to train on. Whatever
            the setting, the fraction of ties is logged as `sapo/tied_fraction`.

        rpo_alpha (`float`, *optional*):
            DPO only (TRL's name and meaning): add `rpo_alpha` times the NLL of the chosen answer
            to the DPO loss (RPO, Pang et al. 2024), logged as `nll_loss`. The NLL is averaged
            over the chosen tokens DPO scores: those past the start the pair's two answers share
            (`gold[:cut]` and any further equal tokens), so a tied pair adds nothing. `None` or
            `0`: off (the paper's loss).{generation}
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

        > Parameters that control what is logged and evaluated while training

        log_pairs_steps (`int`, *optional*, defaults to `100`):
            Every this many optimizer steps and at the last one, append the 4 newest replay-buffer
            pairs, decoded, to `output_dir/pairs.jsonl` (prompt, gold, and the rejected answer with
            the span the EMA model rewrote marked `⟦...⟧`), and show them as a table on W&B or
            trackio when they are in `report_to`; main process only. `0` disables it.
        eval_lm_tasks (`str`, *optional*):
            Comma-separated lm-evaluation-harness tasks (e.g. `ifeval`, or local tasks of
            `eval_lm_include_path`) run on the policy every `eval_lm_steps` steps and logged as
            `eval_<task>/<metric>`; needs `pip install 'sapo[eval]'` and a single process.
            The held-out margins of `eval_dataset` follow Trainer's `eval_strategy` instead.
        eval_lm_steps (`int`, *optional*, defaults to `500`):
            Run `eval_lm_tasks` every this many optimizer steps.
        eval_lm_limit (`int` or `None`, *optional*, defaults to `100`):
            Documents per task in each of those runs (the harness's `limit`), to keep them cheap;
            `None` runs every document.
        eval_lm_include_path (`str`, *optional*):
            Folder of local lm-eval task YAML files for `eval_lm_tasks`.

    > [!NOTE]
    > Defaults that differ from [`~transformers.TrainingArguments`]: `logging_steps=10` and
    > `remove_unused_columns=False` (the trainer builds its batches from the replay buffer).
    """

    loss_type: LossType = field(
        default="dpo",
        metadata={"help": "Preference loss: 'dpo' (with a reference model) or 'orpo' (without)."},
    )
    allow_low_precision_weights: bool = field(
        default=False,
        metadata={"help": "Train bfloat16/float16 weights that no float32 master copy backs."},
    )
    pair_scoring: PairScoring = field(
        default="auto",
        metadata={"help": "'packed' (one row per pair), 'padded' (two rows), 'auto': packed where possible."},
    )
    logprob_chunk_size: int | None = field(
        default=256,
        metadata={"help": "Positions per chunk of the LM head when scoring pairs; 0 or None: all at once."},
    )
    segment_length: int = field(
        default=256, metadata={"help": "Tokens of the gold answer the EMA model rewrites."}
    )
    segment_placement: SegmentPlacement = field(
        default="uniform",
        metadata={"help": "'uniform' (the paper's cut) or 'uncertain' (where the EMA model is least sure)."},
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of segment generation."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling threshold of segment generation."})
    top_k: int = field(default=50, metadata={"help": "Top-k filter of segment generation; 0 disables it."})
    sample_every_n_steps: int = field(
        default=1, metadata={"help": "Generate segments every this many optimizer steps; no row is skipped."}
    )
    generation_num_threads: int | None = field(
        default=1, metadata={"help": "CPU only: torch threads while sampling segments; None: unchanged."}
    )
    skip_tied_pairs: bool = field(
        default=False, metadata={"help": "Keep pairs whose rewrite equals the gold answer out of the buffer."}
    )
    rpo_alpha: float | None = field(
        default=None,
        metadata={"help": "DPO: weight of the chosen answer's NLL added to the loss; None: off."},
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
    log_pairs_steps: int = field(
        default=100, metadata={"help": "Append 4 decoded buffer pairs to output_dir/pairs.jsonl; 0: off."}
    )
    eval_lm_tasks: str | None = field(
        default=None, metadata={"help": "Comma-separated lm-eval tasks run every eval_lm_steps steps."}
    )
    eval_lm_steps: int = field(default=500, metadata={"help": "Run eval_lm_tasks every this many steps."})
    eval_lm_limit: int | None = field(
        default=100, metadata={"help": "Documents per lm-eval task in each run; None: all."}
    )
    eval_lm_include_path: str | None = field(
        default=None, metadata={"help": "Folder of local lm-eval task YAML files."}
    )

    def generated_length(self) -> int:
        return self.segment_length

    def validate(self, check: Checks) -> None:
        check.choice("loss_type", LOSS_TYPES)
        check.choice("pair_scoring", PAIR_SCORINGS)
        if self.logprob_chunk_size is not None and self.logprob_chunk_size < 0:
            check.fail("logprob_chunk_size", "must be a number of positions, or 0 or None for no chunks")
        self.check_generation(check)
        check.choice("segment_placement", SEGMENT_PLACEMENTS)
        check.positive("segment_length", what="must be a positive number of tokens")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            check.fail("rpo_alpha", "must be a non-negative weight, or None for off")
        if self.rpo_alpha and self.loss_type != "dpo":
            check.fail("rpo_alpha", "applies to loss_type='dpo' only (ORPO has its own NLL term)")
        try:
            check_decay(self.ema_decay)
        except ValueError:
            check.fail("ema_decay", "must be in [0, 1)")
        check.positive(
            "ema_update_interval", "sample_every_n_steps", what="must be a positive number of optimizer steps"
        )
        check.positive(
            "ref_model_sync_steps",
            what="must be a positive number of optimizer steps, or None for once per epoch",
        )
        check.positive("generation_num_threads", what="must be at least 1, or None to leave torch's setting")
        if self.replay_buffer_size < max(1, self.per_device_train_batch_size):
            check.fail(
                "replay_buffer_size",
                f"must hold at least one batch ({self.per_device_train_batch_size} pairs)",
            )
        check.sampling()
        if self.log_pairs_steps < 0:
            check.fail("log_pairs_steps", "must be a number of optimizer steps, or 0 to disable")
        check.positive("eval_lm_steps", "eval_lm_limit", what="must be positive")
        super().validate(check)


SAPOConfig.__doc__ = SAPOConfig.__doc__.replace("{shared}", SHARED_FIELDS_DOC).replace(
    "{generation}", GENERATION_FIELDS_DOC
)
