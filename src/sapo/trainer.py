"""``SAPOTrainer``: the SAPO loop wired onto ``transformers.Trainer``.

Per optimizer step ``t`` (gradient accumulation counts once), in order:

1. generate (every ``sample_every_n_steps`` steps): for the rows of this step and the next
   ``sample_every_n_steps - 1`` steps, the EMA model rewrites a window of each gold answer in
   one batched call; ``(prompt, gold, rejected)`` enters the replay buffer
   (:meth:`SAPOTrainer.get_batch_samples`, :meth:`SAPOTrainer._generate_pairs`);
2. sample a batch from the buffer, least-drawn pairs first (:meth:`SAPOTrainer.training_step`);
   a pair drawn more than once in a batch is scored once and its loss counted as often as drawn;
3. DPO or ORPO loss on that batch (:meth:`SAPOTrainer.compute_loss`), optimizer step by Trainer;
4. EMA update, then, for DPO, maybe copy the EMA into the reference
   (:meth:`SAPOTrainer._after_optimizer_step`).

Trainer keeps the optimizer, schedule, precision, devices, logging and progress bar; SAPO's
pieces (``segments``, ``buffer``, ``ema``, ``generation``, ``losses``) know nothing of this class.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import math
import os
import shutil
import time
from collections import defaultdict, deque
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    PreTrainedModel,
    Trainer,
    TrainerCallback,
)
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import TrainOutput, rotate_checkpoints
from transformers.utils import logging

from . import checkpoint
from .adapters import is_peft_model, policy_adapter_name
from .buffer import ReplayBuffer
from .config import SAPOConfig
from .data import GOLD_IDS, PROMPT_IDS, collate_rows, prepare_dataset
from .generation import SegmentGenerator, self_augmented_pairs
from .logprobs import collate_pairs, completion_logps
from .objective import distinct_pairs, preference_objective
from .packing import pack_pairs, packed_completion_logps, supports_packing
from .policy import eos_token_ids, prepare_policy
from .reference import build_ema_and_reference, distribute_like_policy, reference_logps
from .sharding import check_supported
from .teardown import release_process_group

logger = logging.get_logger(__name__)


class _AfterOptimizerStep(TrainerCallback):
    def __init__(self, trainer: SAPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.trainer._set_sync_interval(train_dataloader)
        # accelerate shards (FSDP2) or partitions (ZeRO-3) the policy only now: do the same to the copies
        trainer = self.trainer
        policy = trainer.accelerator.unwrap_model(trainer.model)
        trainer.ema, trainer.reference = distribute_like_policy(
            policy, trainer.ema, trainer.reference, trainer.accelerator, trainer.model_wrapped
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step(state.global_step)


class SAPOTrainer(Trainer):
    """Trainer for Self-Augmented Preference Optimization.

    Args:
        model: the policy, as a model or a model id/path (loaded with `AutoModelForCausalLM`).
        args: a [`SAPOConfig`].
        train_dataset: SFT rows, `messages` or `prompt`/`completion` (see `sapo.data`).
        processing_class: the tokenizer; loaded from `model` when it is an id.
        peft_config: a `peft` config; the policy is then wrapped with `get_peft_model`.
        ref_model: DPO only: the initial reference; a copy of the policy when `None`.
        callbacks, optimizers: as for `transformers.Trainer`.
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
                    train_dataset,
                    processing_class,
                    args.max_length,
                    args.max_prompt_length,
                    args.dataset_num_proc,
                )

        super().__init__(
            model=model,
            args=args,
            data_collator=collate_rows,
            train_dataset=train_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # the loss is a mean over the batch: Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False

        policy = self.accelerator.unwrap_model(self.model)
        check_supported(self.accelerator.state, is_peft_model(policy))
        rank = self.args.process_index
        self.eos_token_ids = eos_token_ids(policy, processing_class)
        self.buffer = ReplayBuffer(args.replay_buffer_size, seed=args.seed + rank)
        self.cut_generator = torch.Generator().manual_seed(args.seed + 7919 * (rank + 1))
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
        self.ema, self.reference = build_ema_and_reference(policy, self.args, ref_model, device)
        self.ref_model_sync_steps = args.ref_model_sync_steps
        self._reference_version = 0  # bumped at every sync; cached reference log-probs carry it
        # chosen and rejected share prompt + gold[:cut]: score both in one packed row where the
        # attention implementation takes a 4D mask, else as two padded rows
        packed = all(supports_packing(m, args.max_length) for m in (policy, ref_model) if m is not None)
        collate = pack_pairs if packed else collate_pairs
        self._collate = functools.partial(collate, pad_token_id=processing_class.pad_token_id)
        self._score = packed_completion_logps if packed else completion_logps
        self._distinct = distinct_pairs
        self._window: deque[list[dict[str, Any]]] = deque()  # row batches of this window's later steps
        self._steps_generated_ahead = 0  # after a resume inside a window: steps whose rows have pairs
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.add_callback(_AfterOptimizerStep(self))
        if self.args.world_size > 1:
            # gloo may abort at interpreter exit while its group is alive; end it first (sapo.teardown)
            atexit.register(release_process_group, self)

    @property
    def ref_model(self):
        """The reference model (DPO; for a PEFT policy, the policy model with its reference adapter)."""
        return None if self.reference is None else self.reference.model

    # -- the SAPO step ---------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch this step's rows; at the start of a generation window, generate for the window.

        A window is ``sample_every_n_steps`` optimizer steps. Its first step also pulls the rows
        of the next steps (kept for them), so one batched call covers every row of the window and
        no row goes without a segment, also at the end of an epoch.
        """
        if self._window:
            return self._window.popleft(), None
        window = [super().get_batch_samples(epoch_iterator, num_batches, device)[0]]
        if self._steps_generated_ahead > 0:
            self._steps_generated_ahead -= 1
            return window[0], None
        for _ in range(self.args.sample_every_n_steps - 1):
            batches = super().get_batch_samples(
                epoch_iterator, self.args.gradient_accumulation_steps, device
            )[0]
            if not batches:
                break
            window.append(batches)
        rows = [
            row for batches in window for batch in batches for row in zip(batch[PROMPT_IDS], batch[GOLD_IDS])
        ]
        if rows:
            self._generate_pairs(rows, self.state.global_step)
        self._window.extend(window[1:])
        return window[0], None

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Train on a buffer batch (each distinct pair scored once); dataset rows only feed generation."""
        pairs = self.buffer.sample(self.args.per_device_train_batch_size)
        distinct, drawn_index = self._distinct(pairs)
        collated = self._collate(distinct)
        batch = {**collated, "drawn_index": drawn_index}
        if self.reference is not None:
            reused = sum(pair.get("ref_version") == self._reference_version for pair in pairs)
            self._record("sapo/reference_reuse", torch.tensor([reused / len(pairs)]))
            scoring = (self._collate, self._score, self.args.device, collated)
            with self.compute_loss_context_manager():
                ref = reference_logps(self.reference, distinct, self._reference_version, *scoring)
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = (logps[drawn_index] for logps in ref)
        return super().training_step(model, batch, num_items_in_batch)

    def _generate_pairs(self, rows: list[tuple[list[int], list[int]]], step: int) -> None:
        """One batched generation call for ``rows``; the pairs enter the buffer."""
        started = time.perf_counter()
        with self.ema.sampling_model() as model, self.accelerator.autocast():
            pairs, generated = self_augmented_pairs(
                model,
                rows,
                self.segment_generator,
                self.cut_generator,
                self.args.segment_length,
                self.args.max_length,
            )
        self._metrics["sapo/generation_seconds"].append(time.perf_counter() - started)
        self._metrics["sapo/segment_tokens"].append(float(generated))
        for pair in pairs:
            self.buffer.add({**pair, "step": step})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """DPO or ORPO on a buffer batch (rows ``[:B]`` chosen, ``[B:]`` rejected)."""
        loss, metrics = preference_objective(model, inputs, self.args.loss_type, self.args.beta, self._score)
        for name, values in metrics.items():
            self._record(name, values)
        if not torch.isfinite(self.accelerator.gather(loss.detach()[None])).all():
            raise FloatingPointError(
                f"non-finite loss at step {self.state.global_step + 1}; stopping before it reaches the "
                "weights (lower the learning rate, check the data, or train in float32)"
            )
        return (loss, metrics) if return_outputs else loss

    def _after_optimizer_step(self, step: int) -> None:
        """EMA update, then (DPO) copy the EMA into the reference when a sync is due."""
        if step % self.args.ema_update_interval == 0:
            self.ema.update(self.accelerator.unwrap_model(self.model))
        if self.reference is not None and self.ref_model_sync_steps and step % self.ref_model_sync_steps == 0:
            self.reference.load_tensors(self.ema.tensors())
            self._reference_version += 1

    def _set_sync_interval(self, train_dataloader) -> None:
        if self.ref_model_sync_steps is None and train_dataloader is not None:
            batches = len(train_dataloader)
            self.ref_model_sync_steps = max(1, math.ceil(batches / self.args.gradient_accumulation_steps))

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

    # -- checkpoints -----------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Train, or resume exactly from a complete checkpoint (a path, or ``True``/``"last"``)."""
        path = checkpoint.resolve(self.args.output_dir, resume_from_checkpoint)
        if path is not None:
            self._load_sapo_state(path)
            reached = TrainerState.load_from_json(os.path.join(path, TRAINER_STATE_NAME))
            if 0 < self.args.max_steps <= reached.global_step:
                # Trainer would run one more step past max_steps; a finished run only reloads
                logger.warning("%s already reached max_steps=%d; nothing to train", path, self.args.max_steps)
                self._load_from_checkpoint(path)
                self.state = reached
                return TrainOutput(reached.global_step, 0.0, {})
        return super().train(resume_from_checkpoint=path, **kwargs)

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

    def _get_output_dir(self, trial) -> str:
        # while a checkpoint is written, Trainer writes it into a staging folder (see _save_checkpoint)
        return getattr(self, "_staging_dir", None) or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint under a temporary name, add SAPO's state, then rename it.

        A process killed at any moment leaves either the complete new checkpoint or none, and
        the previous ones untouched (older ones are rotated out only after the rename).
        """
        policy = self.accelerator.unwrap_model(self.model)
        if not checkpoint.weights_finite(policy, self.accelerator):
            raise FloatingPointError(
                f"non-finite weights at step {self.state.global_step}; no checkpoint written"
            )
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        self._staging_dir = os.path.join(run_dir, ".staging")
        staged = os.path.join(self._staging_dir, name)
        if self.args.should_save and os.path.exists(staged):  # left by a run killed while saving
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        tensors, metadata = self._rank_state()
        checkpoint.save_rank_state(staged, self.args.process_index, tensors, metadata)
        # every rank: sharded weights are gathered before the main process writes them
        checkpoint.save_weights(self.ema, os.path.join(staged, checkpoint.EMA_FILE), self.args.should_save)
        if self.reference is not None:
            checkpoint.save_weights(
                self.reference, os.path.join(staged, checkpoint.REFERENCE_FILE), self.args.should_save
            )
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoint.write_json(
                os.path.join(staged, checkpoint.RUN_FILE),
                checkpoint.run_identity(
                    self.args, self.train_dataset, self.accelerator.unwrap_model(self.model)
                ),
            )
            checkpoint.publish(staged, os.path.join(run_dir, name))
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(staged))
            rotate_checkpoints(
                run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=False
            )
        self.accelerator.wait_for_everyone()

    def _rank_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, buffer_metadata = checkpoint.buffer_to_tensors(self.buffer.state_dict())
        tensors["cut_generator_state"] = self.cut_generator.get_state()
        tensors["sampling_generator_state"] = self.segment_generator.generator.get_state()
        metadata = {
            "buffer": buffer_metadata,
            "global_step": self.state.global_step,
            "ema_updates": self.ema.num_updates,
            "ref_model_sync_steps": self.ref_model_sync_steps,
            "reference_version": self._reference_version,
            "steps_generated_ahead": len(self._window) + self._steps_generated_ahead,
        }
        return tensors, metadata

    def _load_sapo_state(self, path: str) -> None:
        checkpoint.check_same_run(
            path,
            checkpoint.read_json(os.path.join(path, checkpoint.RUN_FILE)),
            checkpoint.run_identity(self.args, self.train_dataset, self.accelerator.unwrap_model(self.model)),
        )
        tensors, metadata = checkpoint.load_rank_state(path, self.args.process_index)
        self.buffer.load_state_dict(checkpoint.buffer_from_tensors(tensors, metadata["buffer"]))
        self.cut_generator.set_state(tensors["cut_generator_state"])
        self.segment_generator.generator.set_state(tensors["sampling_generator_state"])
        self.ema.num_updates = metadata["ema_updates"]
        self.ref_model_sync_steps = metadata["ref_model_sync_steps"]
        self._reference_version = metadata["reference_version"]
        self._steps_generated_ahead = metadata["steps_generated_ahead"]
        self._window.clear()
        checkpoint.load_weights(self.ema, os.path.join(path, checkpoint.EMA_FILE))
        if self.reference is not None:
            checkpoint.load_weights(self.reference, os.path.join(path, checkpoint.REFERENCE_FILE))
