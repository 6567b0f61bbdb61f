"""``SAPOTrainer``: the SAPO loop wired onto ``transformers.Trainer``.

Per optimizer step ``t`` (gradient accumulation counts once), in the order of this file:

1. **generate** (at the first step of every window of ``sample_every_n_steps`` steps): the EMA
   model rewrites a window of each gold answer of the window's rows in one batched call
   (:meth:`SAPOTrainer.get_batch_samples` → :meth:`SAPOTrainer.generate_pairs`);
2. **buffer**: the pairs enter the replay buffer (:meth:`SAPOTrainer.generate_pairs`);
3. **sample** a batch from the buffer, least-drawn pairs first, and score the reference on the
   pairs whose reference log-probs are not cached (:meth:`SAPOTrainer.training_step`);
4. **loss**: DPO or ORPO on that batch (:meth:`SAPOTrainer.compute_loss`);
5. **step**: backward and optimizer step, by Trainer;
6. **EMA** update, then 7. (DPO) **sync** the reference from the EMA when due
   (:meth:`SAPOTrainer.after_optimizer_step`).

Trainer keeps the optimizer, schedule, precision, devices, logging and progress bar. SAPO's
components (``segments``, ``buffer``, ``ema``, ``generation``, ``losses``, ``copies``) know nothing
of this class; its checkpoint part is :class:`sapo.checkpoints.SAPOState`.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import time
from collections import defaultdict

import torch
from datasets import Dataset
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import TrainOutput
from transformers.utils import logging

import sapo.checkpoints as checkpoints
from sapo.buffer import ReplayBuffer
from sapo.config import SAPOConfig
from sapo.copies import build_ema_and_reference, check_supported, distribute_like_policy
from sapo.copies.teardown import release_process_group
from sapo.data import GOLD_IDS, PROMPT_IDS, collate_rows, prepare_dataset
from sapo.evaluation.during_training import held_out_metrics, tokenized_rows, training_callbacks
from sapo.generation import SegmentGenerator, self_augmented_pairs
from sapo.hub import write_model_card
from sapo.objective import distinct_pairs, preference_objective
from sapo.policy import (
    check_master_precision,
    eos_token_ids,
    is_peft_model,
    policy_adapter_name,
    prepare_policy,
)
from sapo.scoring import pair_scorer, reference_logps
from sapo.window import GenerationWindow

logger = logging.get_logger(__name__)


class _DistributeCopies(TrainerCallback):
    """At train begin: accelerate has now sharded (FSDP2) or partitioned (ZeRO-3) the policy;
    place the EMA and the reference alike, and fix a once-per-epoch sync interval."""

    def __init__(self, trainer: SAPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        trainer = self.trainer
        progress = trainer.sapo_state.progress
        if progress.ref_model_sync_steps is None and train_dataloader is not None:
            steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
            progress.ref_model_sync_steps = max(1, steps_per_epoch)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        trainer.ema, trainer.reference = distribute_like_policy(
            policy, trainer.ema, trainer.reference, trainer.accelerator, trainer.model_wrapped
        )


class _AfterOptimizerStep(TrainerCallback):
    def __init__(self, trainer: SAPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.after_optimizer_step(state.global_step)


class SAPOTrainer(Trainer):
    """Trainer for Self-Augmented Preference Optimization.

    Args:
        model: the policy, as a model or a model id/path (loaded with `AutoModelForCausalLM`).
        args: a [`SAPOConfig`].
        train_dataset: SFT rows, `messages` or `prompt`/`completion` (see `sapo.data`).
        processing_class: the tokenizer; loaded from `model` when it is an id.
        peft_config: a `peft` config; the policy is then wrapped with `get_peft_model`.
        ref_model: DPO only: the initial reference; a copy of the policy when `None`.
        eval_dataset, callbacks, optimizers: as for `transformers.Trainer` (`evaluate()`: SAPO's margins).

    Public attributes: `buffer` (the replay buffer), `ema` and `reference` (see
    `sapo.copies.contract`), `segment_generator`, `scorer` (how pairs are scored, from
    `pair_scoring`) and `eos_token_ids` (every id that ends an answer).
    """

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: SAPOConfig | None = None,
        train_dataset: Dataset | None = None,
        processing_class=None,
        peft_config=None,
        ref_model: PreTrainedModel | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        eval_dataset: Dataset | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SAPOConfig(output_dir=f"{str(name).split('/')[-1] or 'model'}-SAPO")
        if not isinstance(args, SAPOConfig):
            raise TypeError(f"args must be a SAPOConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise ValueError("train_dataset is required: SAPO generates its pairs from it")
        if ref_model is not None and args.loss_type == "orpo":
            raise ValueError(
                "ref_model: ORPO uses no reference model; pass ref_model only with loss_type='dpo'"
            )
        model, processing_class = prepare_policy(model, args, processing_class, peft_config)
        if not (PROMPT_IDS in train_dataset.column_names and GOLD_IDS in train_dataset.column_names):
            with args.main_process_first(desc="tokenizing the training set"):
                train_dataset = prepare_dataset(
                    train_dataset, processing_class, args.max_length, args.max_prompt_length,
                    args.dataset_num_proc,
                )  # fmt: skip
        super().__init__(
            model=model,
            args=args,
            data_collator=collate_rows,
            train_dataset=train_dataset,
            eval_dataset=tokenized_rows(eval_dataset, processing_class, args),
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # the loss is a mean over the batch: Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False

        policy = self.accelerator.unwrap_model(self.model)
        check_supported(self.accelerator.state)
        check_master_precision(policy, args, self.accelerator.state)  # float32 masters, or refuse
        rank = self.args.process_index
        self.eos_token_ids = eos_token_ids(policy, processing_class)
        self.segment_generator = SegmentGenerator(
            pad_token_id=processing_class.pad_token_id,
            eos_token_ids=self.eos_token_ids,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed + 104729 * (rank + 1),
            num_threads=args.generation_num_threads,
            backend=args.generation_backend,
        )
        # under FSDP or ZeRO-3, whole copies wait on the CPU to be distributed when training starts
        device = "cpu" if self.is_fsdp_enabled or is_deepspeed_zero3_enabled() else None
        ema, reference = build_ema_and_reference(policy, self.args, ref_model, device)
        self.sapo_state = checkpoints.SAPOState(
            buffer=ReplayBuffer(args.replay_buffer_size, seed=args.seed + rank),
            cut_generator=torch.Generator().manual_seed(args.seed + 7919 * (rank + 1)),
            sampling_generator=self.segment_generator.generator,
            ema=ema,
            reference=reference,
            window=GenerationWindow(args.sample_every_n_steps),
            progress=checkpoints.Progress(ref_model_sync_steps=args.ref_model_sync_steps),
        )
        # chosen and rejected share prompt + gold[:cut]: by default both are scored in one packed
        # row where the attention implementation takes a 4D mask, else as two padded rows; the LM
        # head runs in chunks, and for DPO not on that shared part (it cancels in the margin)
        models = [m for m in (policy, ref_model) if m is not None]
        self.scorer = pair_scorer(
            args.pair_scoring, processing_class.pad_token_id, models, args.max_length,
            chunk_size=args.logprob_chunk_size, score_shared_prefix=args.loss_type != "dpo",
        )  # fmt: skip
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.add_callback(_DistributeCopies(self))
        self.add_callback(_AfterOptimizerStep(self))
        for callback in training_callbacks(args, processing_class, lambda: self.buffer.items(), super().log):
            self.add_callback(callback)  # pairs.jsonl, lm-eval tasks (sapo.evaluation)
        if self.args.world_size > 1:
            # gloo may abort at interpreter exit while its group is alive; end it first (sapo.copies.teardown)
            atexit.register(release_process_group, self)

    # the components, by their names in the paper's loop
    buffer = property(lambda self: self.sapo_state.buffer)
    cut_generator = property(lambda self: self.sapo_state.cut_generator)
    ema = property(
        lambda self: self.sapo_state.ema, lambda self, value: setattr(self.sapo_state, "ema", value)
    )
    reference = property(
        lambda self: self.sapo_state.reference,
        lambda self, value: setattr(self.sapo_state, "reference", value),
    )

    @property
    def ref_model(self):
        """The reference model (DPO; for a PEFT policy, the policy model with its reference adapter)."""
        return None if self.reference is None else self.reference.model

    @property
    def ref_model_sync_steps(self) -> int | None:
        """The reference sync interval in force (one epoch's steps when `ref_model_sync_steps` is unset)."""
        return self.sapo_state.progress.ref_model_sync_steps

    # -- 1. generate and 2. buffer ---------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """This step's rows; at the first step of a generation window, generate for the whole window."""
        fetch = super().get_batch_samples
        step = self.state.global_step
        batches = self.sapo_state.window.next_step(
            fetch_first=lambda: fetch(epoch_iterator, num_batches, device)[0],
            fetch_later=lambda: fetch(epoch_iterator, self.args.gradient_accumulation_steps, device)[0],
            generate=lambda rows: self.generate_pairs(rows, step),
        )
        return batches, None

    def generate_pairs(self, rows: list[tuple[list[int], list[int]]], step: int) -> None:
        """One batched generation call for ``rows`` (``(prompt_ids, gold_ids)``); the pairs enter
        the buffer stamped with ``step``. A subclass may override this (e.g. to time the update
        step alone on a buffer it filled itself)."""
        started = time.perf_counter()
        with self.ema.sampling_model() as model, self.accelerator.autocast():
            pairs, generated = self_augmented_pairs(
                model, rows, self.segment_generator, self.cut_generator, self.args.segment_length,
                self.args.max_length,
            )  # fmt: skip
        self._metrics["sapo/generation_seconds"].append(time.perf_counter() - started)
        self._metrics["sapo/segment_tokens"].append(float(generated))
        tied = [pair["rejected_ids"] == pair["chosen_ids"] for pair in pairs]
        self._metrics["sapo/tied_fraction"].append(sum(tied) / max(1, len(pairs)))
        skip = self.args.skip_tied_pairs and (len(self.buffer) or not all(tied))  # never leave it empty
        for pair in (pair for pair, is_tie in zip(pairs, tied) if not (skip and is_tie)):
            self.buffer.add({**pair, "step": step})

    # -- 3. sample -------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Train on a buffer batch (each distinct pair scored once); dataset rows only feed generation."""
        pairs = self.buffer.sample(self.args.per_device_train_batch_size)
        distinct, drawn_index = distinct_pairs(pairs)
        collated = self.scorer.collate(distinct)
        batch = {**collated, "drawn_index": drawn_index}
        if self.reference is not None:
            version = self.sapo_state.progress.reference_version
            reused = sum(pair.get("ref_version") == version for pair in pairs)
            self._record("sapo/reference_reuse", torch.tensor([reused / len(pairs)]))
            with self.compute_loss_context_manager():
                ref = reference_logps(
                    self.reference, distinct, version, self.scorer, self.args.device, collated
                )
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = (logps[drawn_index] for logps in ref)
        return super().training_step(model, batch, num_items_in_batch)

    # -- 4. loss (5. backward and optimizer step: Trainer) ---------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """DPO or ORPO on a buffer batch (rows ``[:B]`` chosen, ``[B:]`` rejected)."""
        loss, metrics = preference_objective(
            model, inputs, self.args.loss_type, self.args.beta, self.scorer.score
        )
        for name, values in metrics.items():
            self._record(name, values)
        if not torch.isfinite(self.accelerator.gather(loss.detach()[None])).all():
            raise FloatingPointError(
                f"non-finite loss at step {self.state.global_step + 1}; stopping before it reaches the "
                "weights (lower the learning rate, check the data, or train in float32)"
            )
        return (loss, metrics) if return_outputs else loss

    # -- 6. EMA and 7. reference sync ------------------------------------------------------------

    def after_optimizer_step(self, step: int) -> None:
        """EMA update, then (DPO) copy the EMA into the reference when a sync is due."""
        if step % self.args.ema_update_interval == 0:
            self.ema.update(self.accelerator.unwrap_model(self.model))
        progress = self.sapo_state.progress
        if (
            self.reference is not None
            and progress.ref_model_sync_steps
            and step % progress.ref_model_sync_steps == 0
        ):
            self.reference.load_tensors(self.ema.tensors())
            progress.reference_version += 1

    # -- logging ---------------------------------------------------------------------------------

    def _record(self, name: str, values: torch.Tensor) -> None:
        values = values.detach().float().reshape(-1)
        self._metrics[name].append(self.accelerator.gather_for_metrics(values).mean().item())

    def _buffer_metrics(self) -> dict[str, float]:
        if len(self.buffer) == 0:
            return {"sapo/buffer_size": 0.0}
        counts = self.buffer.times_sampled()
        ages = [self.state.global_step - item["step"] for item in self.buffer.items()]
        return {
            "sapo/buffer_size": float(len(self.buffer)),
            "sapo/mean_times_sampled": sum(counts) / len(counts),
            "sapo/mean_pair_age": sum(ages) / len(ages),
        }

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged SAPO and preference metrics recorded since the last log."""
        if self._metrics:
            logs.update({name: sum(values) / len(values) for name, values in self._metrics.items()})
            logs.update(self._buffer_metrics())
            self._metrics.clear()
        super().log(logs, start_time)

    # -- evaluation (sapo.evaluation.during_training) --------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Log and return the policy's held-out margin, win rate and gold log-prob (not Trainer's loop)."""
        rows = self.eval_dataset if eval_dataset is None else eval_dataset
        settings = (self.processing_class, self.args, self.accelerator, metric_key_prefix)
        metrics = held_out_metrics(self.model, rows, *settings)
        super().log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- checkpoints (SAPO's part: sapo.checkpoints) ---------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Train, or resume exactly from a checkpoint that verifies (a path, or ``True``/``"last"``)."""
        path = checkpoints.resolve_on_main(self.args.output_dir, resume_from_checkpoint, self.accelerator)
        if path is not None:
            checkpoints.check_same_run(
                path, checkpoints.read_json(os.path.join(path, checkpoints.RUN_FILE)), self._run_identity()
            )
            self.sapo_state.load(path, self.args.process_index)
            reached = checkpoints.trainer_state(path)
            if 0 < self.args.max_steps <= reached.global_step:
                # Trainer would run one more step past max_steps; a finished run only reloads
                logger.warning("%s already reached max_steps=%d; nothing to train", path, self.args.max_steps)
                self._load_from_checkpoint(path)
                self.state = reached
                return TrainOutput(reached.global_step, 0.0, {})
        return super().train(resume_from_checkpoint=path, **kwargs)

    def _run_identity(self) -> dict:
        return checkpoints.run_identity(
            self.args, self.train_dataset, self.accelerator.unwrap_model(self.model)
        )

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Save the model; for a PEFT policy only the policy adapter (not SAPO's EMA and reference)."""
        policy = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(policy):
            return super()._save(output_dir, state_dict)
        save_all = policy.save_pretrained
        policy.save_pretrained = functools.partial(save_all, selected_adapters=[policy_adapter_name(policy)])
        try:
            super()._save(output_dir, state_dict)
        finally:
            del policy.save_pretrained  # back to the class's method

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model with its model card, ``README.md`` (checkpoints too: sealed with it)."""
        super().save_model(output_dir, _internal_call)
        self.create_model_card(output_dir=output_dir)

    def create_model_card(self, output_dir: str | None = None, **names) -> None:
        """Write SAPO's model card (:mod:`sapo.hub`) into ``output_dir``, by default the folder
        ``push_to_hub`` uploads; ``names``: ``model_name``, ``dataset_name``, ``base_model``, ``tags``."""
        if self.args.should_save:
            in_force = {} if self.reference is None else {"ref_model_sync_steps": self.ref_model_sync_steps}
            write_model_card(output_dir or self.args.output_dir, self, settings_in_force=in_force, **names)

    def _get_output_dir(self, trial) -> str:
        # while a checkpoint is written, Trainer writes it into the staging folder (_save_checkpoint)
        return getattr(self, "_staging_dir", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write Trainer's checkpoint and SAPO's state into a staging folder, then publish it.

        A process killed at any moment leaves either the complete new checkpoint or none, and
        the previous ones untouched (older ones are rotated out only after the rename).
        """
        if not checkpoints.weights_finite(self.accelerator.unwrap_model(self.model), self.accelerator):
            raise FloatingPointError(
                f"non-finite weights at step {self.state.global_step}; no checkpoint written"
            )
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        is_main = self.args.should_save
        with checkpoints.staged_checkpoint(
            run_dir, name, is_main, self.accelerator.wait_for_everyone
        ) as staged:
            self._staging_dir = os.path.dirname(staged)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_dir = None
            self.sapo_state.save(staged, self.args.process_index, is_main, self.state.global_step)
            self.accelerator.wait_for_everyone()
            if is_main:  # written last, with every file's checksum: a folder without it is not complete
                checkpoints.seal(staged, self._run_identity())
        if is_main:
            checkpoints.rotate(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
