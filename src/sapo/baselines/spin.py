"""SPIN (Self-Play fINe-tuning), the iterative baseline SAPO is compared with in its paper.

Each iteration, the current model answers every prompt of the dataset (one batched ``generate``
call per batch of prompts, greedy by default), then trains with DPO on gold (chosen) against its
own answers (rejected), the reference being the model as it was at the start of the iteration.
From the second iteration on, the previous iteration's pairs are mixed in (SPIN's recipe).
The pieces are sapo's own: data preparation, batched generation, the pair collator, the cached
reference log-probs and the DPO objective.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field

from datasets import Dataset
from tqdm.auto import tqdm
from transformers import Trainer

from sapo.checkpoints import owning_output_dir
from sapo.config import GENERATION_FIELDS_DOC, SHARED_FIELDS_DOC, GenerationOptions, PreferenceConfig
from sapo.copies.whole import CopiedReference
from sapo.data import GOLD_IDS, PROMPT_IDS, prepare_dataset
from sapo.hub import SPIN, write_model_card
from sapo.objective import preference_objective
from sapo.pairs import Pair
from sapo.policy import eos_token_ids, prepare_policy
from sapo.sampling import Sampler, evaluating
from sapo.sampling.vllm import backend_for
from sapo.scoring import pair_scorer, reference_logps


@dataclass
class SPINConfig(PreferenceConfig, GenerationOptions):
    """
    Configuration of [`run_spin`]. Every [`~transformers.TrainingArguments`] field applies to each
    iteration's training (e.g. `num_train_epochs` per iteration).

    Parameters:{shared}
        spin_iterations (`int`, *optional*, defaults to `3`):
            Number of generate-then-train rounds.
        max_new_tokens (`int`, *optional*, defaults to `256`):
            Longest generated answer.
        temperature (`float` or `None`, *optional*, defaults to `None`):
            Sampling temperature of the generated answers; `None` decodes greedily (SPIN's choice).
        generation_batch_size (`int`, *optional*, defaults to `64`):
            Prompts per `generate` call.
        mix_previous_iteration (`bool`, *optional*, defaults to `True`):
            From the second iteration on, train on the previous iteration's pairs as well as the
            new ones (gold against the previous model's answers), as SPIN's recipe does; the
            iteration's dataset then holds twice as many pairs.{generation}

    > [!NOTE]
    > Defaults that differ from [`~transformers.TrainingArguments`]: `logging_steps=10`,
    > `remove_unused_columns=False`, `save_strategy="no"` (each iteration's model is saved under
    > `output_dir/iteration-k`).
    """

    spin_iterations: int = field(default=3, metadata={"help": "Number of generate-then-train rounds."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest generated answer."})
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature; None: greedy."})
    generation_batch_size: int = field(default=64, metadata={"help": "Prompts per generate call."})
    mix_previous_iteration: bool = field(
        default=True, metadata={"help": "Also train on the previous iteration's pairs (SPIN's recipe)."}
    )
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy inside an iteration."})

    def generated_length(self) -> int:
        return self.max_new_tokens

    def validate(self, check) -> None:
        check.positive("spin_iterations", "max_new_tokens", "generation_batch_size")
        check.positive("temperature", what="must be positive, or None for greedy")
        self.check_generation(check)
        super().validate(check)


SPINConfig.__doc__ = SPINConfig.__doc__.replace("{shared}", SHARED_FIELDS_DOC).replace(
    "{generation}", GENERATION_FIELDS_DOC
)


def generate_answers(
    model, rows, tokenizer, args: SPINConfig, seed: int, backend="auto", version: int | None = None
) -> list[list[int]]:
    """The model's own answer to every prompt, batched, each ending at EOS or ``max_new_tokens``;
    ``backend`` samples (a name or a :class:`~sapo.sampling.SamplingBackend`), ``version`` names
    the model's weights (see :meth:`~sapo.sampling.Sampler.generate`)."""
    eos = eos_token_ids(model, tokenizer)
    if args.temperature is None:
        sampler = Sampler.greedy(tokenizer.pad_token_id, eos, seed=seed, backend=backend)
    else:
        sampler = Sampler(
            tokenizer.pad_token_id, eos, temperature=args.temperature, top_p=1.0, top_k=0, seed=seed,
            backend=backend,
        )  # fmt: skip
    answers = []
    with evaluating(model):
        for start in tqdm(
            range(0, len(rows), args.generation_batch_size), desc="SPIN generation", leave=False
        ):
            prompts = [prompt for prompt, _ in rows[start : start + args.generation_batch_size]]
            limits = [max(1, min(args.max_new_tokens, (args.max_length or 10**9) - len(p))) for p in prompts]
            answers.extend(sampler.generate(model, prompts, limits, version=version))
    return answers


PAIR_IDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def _as_pairs(rows: list[dict]) -> list[Pair]:
    return [Pair(*(row[name] for name in PAIR_IDS)) for row in rows]


class PairTrainer(Trainer):
    """DPO on a fixed dataset of pairs against a frozen reference (one SPIN iteration)."""

    def __init__(self, model, args: SPINConfig, pairs: Dataset, reference: CopiedReference, tokenizer):
        super().__init__(
            model=model, args=args, train_dataset=pairs, data_collator=_as_pairs, processing_class=tokenizer
        )
        self.model_accepts_loss_kwargs = False
        self.reference = reference
        self._scorer = pair_scorer("padded", tokenizer.pad_token_id, [model], args.max_length)
        self._metrics: dict[str, list[float]] = {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        batch = self._scorer.collate(inputs)
        with self.compute_loss_context_manager():
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = reference_logps(
                self.reference, inputs, self._scorer, self.args.device, batch
            )
        return super().training_step(model, batch, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = preference_objective(model, inputs, "dpo", self.args.beta, self._scorer.score)
        for name, values in metrics.items():
            gathered = self.accelerator.gather_for_metrics(values.float().reshape(-1)).mean().item()
            self._metrics.setdefault(name, []).append(gathered)
        return (loss, metrics) if return_outputs else loss

    def log(self, logs, start_time=None):
        logs.update({name: sum(values) / len(values) for name, values in self._metrics.items()})
        self._metrics.clear()
        super().log(logs, start_time)


def run_spin(model, args: SPINConfig, train_dataset: Dataset, processing_class=None, card_names=None):
    """Run ``args.spin_iterations`` SPIN iterations; returns the final model and each iteration's log.

    Each iteration's model is saved under ``output_dir/iteration-k`` with its model card
    (:mod:`sapo.hub`; ``card_names``: ``base_model``, ``dataset_name`` as the caller named them).

    Each iteration's log is Trainer's ``log_history`` after one first entry that records the cost
    of that iteration's generation (``spin/generated_tokens``, ``spin/generation_seconds``) and the
    number of pairs it trains on (``spin/pairs``: the previous iteration's are mixed in).

    The run owns ``output_dir`` meanwhile: a folder holding an earlier run's work is refused unless
    ``overwrite_output_dir``, and one another run is using is refused (:mod:`sapo.checkpoints.ownership`).
    """
    with owning_output_dir(args, None, args.overwrite_output_dir, can_resume=False):
        return _iterations(model, args, train_dataset, processing_class, card_names)


def _iterations(model, args: SPINConfig, train_dataset: Dataset, processing_class, card_names):
    model, tokenizer = prepare_policy(model, args, processing_class)
    data = prepare_dataset(train_dataset, tokenizer, args.max_length, args.max_prompt_length)
    rows = list(zip(data[PROMPT_IDS], data[GOLD_IDS]))
    backend = backend_for(args, model, args.max_length, seed=args.seed)
    histories = []
    previous: list[Pair] = []  # the last iteration's pairs, mixed into the next one
    for iteration in range(args.spin_iterations):
        started = time.perf_counter()
        answers = generate_answers(
            model, rows, tokenizer, args, seed=args.seed + iteration, backend=backend, version=iteration
        )
        generation = {
            "spin/iteration": iteration + 1,
            "spin/generated_tokens": sum(len(answer) for answer in answers),
            "spin/generation_seconds": time.perf_counter() - started,
        }
        current = [Pair(list(p), list(g), a) for (p, g), a in zip(rows, answers)]
        generation["spin/pairs"] = len(current) + len(previous)
        pairs = Dataset.from_dict(
            {name: [getattr(pair, name) for pair in current + previous] for name in PAIR_IDS}
        )
        previous = current if args.mix_previous_iteration else []
        reference = CopiedReference(copy.deepcopy(model), args.device, args.disable_dropout)
        iteration_args = copy.deepcopy(args)
        iteration_args.output_dir = os.path.join(args.output_dir, f"iteration-{iteration + 1}")
        trainer = PairTrainer(model, iteration_args, pairs, reference, tokenizer)
        trainer.train()
        trainer.save_model()
        if trainer.args.should_save:
            note = f"This is iteration {iteration + 1} of {args.spin_iterations}."
            write_model_card(trainer.args.output_dir, trainer, method=SPIN, note=note, **(card_names or {}))
        histories.append([generation, *trainer.state.log_history])
        model = trainer.accelerator.unwrap_model(trainer.model)
    return model, histories
