"""``SAPOTrainer``: the SAPO loop wired onto ``transformers.Trainer``.

Per optimizer step ``t`` (gradient accumulation counts once), the paper's loop, in this order:

1. **generate**: at the first step of every round of ``sample_every_n_steps`` steps, the EMA model
   rewrites a span of each gold answer of the round's rows in one batched call;
2. **buffer**: the pairs enter the replay buffer;
3. **sample** a batch from the buffer, least-drawn pairs first, with the reference log-probs of
   the pairs that have none for the current reference;
4. **loss**: DPO or ORPO on that batch, and backward;
5. **step**: the optimizer step (Trainer's);
6. **EMA** update, then 7. (DPO) **sync** the reference from the EMA when due.

Steps 1 to 4 are :meth:`SAPOTrainer.training_step` (once per accumulation step), 6 and 7
:meth:`SAPOTrainer.after_optimizer_step` (right after Trainer's step 5). Trainer keeps the
optimizer, schedule, precision, devices, logging and progress bar. SAPO's parts are this
trainer's attributes, built from components that know nothing of it; :mod:`sapo.checkpoints`
saves and restores them.
"""

from __future__ import annotations

import atexit
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
from sapo.buffer import ReplayBuffer, buffer_metrics
from sapo.config import SAPOConfig
from sapo.copies import build_ema_and_reference, check_supported, distribute_like_policy
from sapo.copies.teardown import release_process_group
from sapo.data import GOLD_IDS, PROMPT_IDS, collate_rows, prepare_dataset
from sapo.evaluation.during_training import held_out_metrics, tokenized_rows, training_callbacks
from sapo.generation import self_augmented_pairs
from sapo.hub import write_model_card
from sapo.objective import drawn_batch, preference_objective
from sapo.policy import (
    check_master_precision,
    eos_token_ids,
    prepare_policy,
    saving_policy_adapter_only,
)
from sapo.sampling import Sampler
from sapo.sampling.vllm import backend_for
from sapo.schedule import GenerationSchedule
from sapo.scoring import pair_scorer, pairs_to_score, reference_logps

logger = logging.get_logger(__name__)

# Each rank draws from generators of its own: seeds offset by distinct primes times (rank + 1), so
# no two generators of a run (nor of two ranks) share a seed, and rank 0's differ from `seed`.
SAMPLING_SEED_OFFSET, CUT_SEED_OFFSET = 104729, 7919


class _LoopHooks(TrainerCallback):
    """Where Trainer's loop calls SAPO's: when training starts (accelerate has now placed the
    policy) and right after each optimizer step."""

    def __init__(self, trainer: SAPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.trainer.place_copies()
        if train_dataloader is not None:
            self.trainer.decide_sync_interval(len(train_dataloader))

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

    Public attributes: `buffer` (the replay buffer of `sapo.pairs.Pair`), `ema` and `reference`
    (see `sapo.copies.contract`), `sampler` (a `sapo.sampling.Sampler`), `cut_generator`,
    `schedule`, `progress`, `scorer` (how pairs are scored, from `pair_scoring`) and
    `eos_token_ids` (every id that ends an answer).
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
            model=model, args=args, data_collator=collate_rows, train_dataset=train_dataset,
            eval_dataset=tokenized_rows(eval_dataset, processing_class, args),
            processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
        )  # fmt: skip
        # the loss is a mean over the batch: Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False

        policy = self.accelerator.unwrap_model(self.model)
        check_supported(self.accelerator.state)
        check_master_precision(policy, args, self.accelerator.state)  # float32 masters, or refuse
        rank = self.args.process_index
        self.eos_token_ids = eos_token_ids(policy, processing_class)
        self.sampler = Sampler(
            pad_token_id=processing_class.pad_token_id,
            eos_token_ids=self.eos_token_ids,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed + SAMPLING_SEED_OFFSET * (rank + 1),
            num_threads=args.generation_num_threads,
            backend=backend_for(args, policy, args.max_length, seed=args.seed),  # vLLM: checked here
        )
        self.cut_generator = torch.Generator().manual_seed(args.seed + CUT_SEED_OFFSET * (rank + 1))
        self.buffer = ReplayBuffer(args.replay_buffer_size, seed=args.seed + rank)
        self.schedule = GenerationSchedule(args.sample_every_n_steps, args.gradient_accumulation_steps)
        self.progress = checkpoints.Progress(ref_model_sync_steps=args.ref_model_sync_steps)
        # under FSDP or ZeRO-3, whole copies wait on the CPU to be distributed when training starts
        device = "cpu" if self.is_fsdp_enabled or is_deepspeed_zero3_enabled() else None
        self.ema, self.reference = build_ema_and_reference(policy, self.args, ref_model, device)
        # chosen and rejected share prompt + gold[:cut]: by default both are scored in one packed
        # row where the attention implementation takes a 4D mask, else as two padded rows; the LM
        # head runs in chunks, and for DPO not on that shared part (it cancels in the margin)
        models = [m for m in (policy, ref_model) if m is not None]
        self.scorer = pair_scorer(
            args.pair_scoring, processing_class.pad_token_id, models, args.max_length,
            chunk_size=args.logprob_chunk_size, score_shared_prefix=args.loss_type != "dpo",
        )  # fmt: skip
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.add_callback(_LoopHooks(self))
        for callback in training_callbacks(args, processing_class, lambda: self.buffer.items(), super().log):
            self.add_callback(callback)  # pairs.jsonl, lm-eval tasks (sapo.evaluation)
        if self.args.world_size > 1:
            # gloo may abort at interpreter exit while its group is alive; end it first (sapo.copies.teardown)
            atexit.register(release_process_group, self)

    @property
    def ref_model(self):
        """The reference model (DPO; for a PEFT policy, the policy model with its reference adapter)."""
        return None if self.reference is None else self.reference.model

    @property
    def ref_model_sync_steps(self) -> int | None:
        """The reference sync interval in force (one epoch's steps when `ref_model_sync_steps` is unset)."""
        return self.progress.ref_model_sync_steps

    # -- when training starts ----------------------------------------------------------------------

    def place_copies(self) -> None:
        """Shard (FSDP2) or partition (ZeRO-3) the EMA and the reference like the policy, which
        accelerate distributes only when training starts; whole copies stay as they are."""
        policy = self.accelerator.unwrap_model(self.model)
        self.ema, self.reference = distribute_like_policy(
            policy, self.ema, self.reference, self.accelerator, self.model_wrapped
        )

    def decide_sync_interval(self, batches_per_epoch: int) -> None:
        """The reference sync interval: ``ref_model_sync_steps`` when set (or restored from a
        checkpoint), else one epoch of optimizer steps."""
        if self.progress.ref_model_sync_steps is None:
            steps_per_epoch = math.ceil(batches_per_epoch / self.args.gradient_accumulation_steps)
            self.progress.ref_model_sync_steps = max(1, steps_per_epoch)

    # -- the loop: 1. generate, 2. buffer, 3. sample, 4. loss --------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """This step's inputs: one per accumulation step, the first carrying the rows to generate
        for (every row of a round at its first step; see :class:`~sapo.schedule.GenerationSchedule`).
        The dataset's rows only feed generation: training batches come from the buffer."""

        def fetch(count):
            return super(SAPOTrainer, self).get_batch_samples(epoch_iterator, count or num_batches, device)[0]

        batches, rows = self.schedule.next_step(fetch)
        return [{"rows": rows if index == 0 else []} for index in range(len(batches))], None

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Steps 1 to 4 of the loop for one accumulation step."""
        if inputs["rows"]:
            self.generate_pairs(inputs["rows"], self.state.global_step)  # 1. generate, 2. buffer
        batch = self.sample_batch()  # 3. sample
        return super().training_step(model, batch, num_items_in_batch)  # 4. loss (compute_loss), backward

    def generate_pairs(self, rows: list[tuple[list[int], list[int]]], step: int) -> None:
        """1. and 2.: one batched generation call for ``rows`` (``(prompt_ids, gold_ids)``); the
        pairs enter the buffer stamped with ``step``. A subclass may override this (e.g. to time
        the update step alone on a buffer it filled itself)."""
        started = time.perf_counter()
        whole = not getattr(self.sampler.backend, "reads_whole_weights_itself", False)  # vLLM: per weight
        with self.ema.sampling_model(whole) as model, self.accelerator.autocast():
            negatives = self_augmented_pairs(
                model, rows, self.sampler, self.cut_generator, self.args.segment_length,
                self.args.max_length, placement=self.args.segment_placement, step=step,
                version=self.ema.num_updates, chunk_size=self.args.logprob_chunk_size,
            )  # fmt: skip
        self._metrics["sapo/generation_seconds"].append(time.perf_counter() - started)
        for name, value in negatives.metrics().items():
            self._metrics[name].append(value)
        pairs = negatives.pairs
        # never leave the buffer empty: it must hold something to train on
        skip = self.args.skip_tied_pairs and (len(self.buffer) or not all(pair.tied for pair in pairs))
        for pair in pairs:
            if not (skip and pair.tied):
                self.buffer.add(pair)

    def sample_batch(self) -> dict[str, torch.Tensor]:
        """3.: a batch drawn from the buffer (each distinct pair scored once, counted per draw),
        with the reference log-probs of its pairs (DPO), computed for those that have none for
        the current reference and cached on them."""
        positions = self.buffer.draw(self.args.per_device_train_batch_size)
        distinct, batch = drawn_batch(
            [self.buffer[position] for position in positions], positions, self.scorer
        )
        if self.reference is not None:
            version = self.progress.reference_version
            missing = pairs_to_score(self.reference, distinct, version)
            reused = sum(self.buffer[position].reference_cached(version) for position in positions)
            self._record("sapo/reference_reuse", torch.tensor([reused / len(positions)]))
            if missing:
                collated = batch if len(missing) == len(distinct) else None
                with self.compute_loss_context_manager():
                    chosen, rejected = reference_logps(
                        self.reference, missing, self.scorer, self.args.device, collated
                    )
                for pair, logps in zip(missing, zip(chosen.tolist(), rejected.tolist())):
                    pair.cache_reference(logps, version)
            drawn = batch["drawn_index"]
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = (
                torch.tensor([pair.reference_logps[side] for pair in distinct], dtype=torch.float32)[drawn]
                for side in (0, 1)
            )
        return batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """4.: DPO or ORPO on a buffer batch (rows ``[:B]`` chosen, ``[B:]`` rejected)."""
        loss, metrics = preference_objective(
            model, inputs, self.args.loss_type, self.args.beta, self.scorer.score, self.args.rpo_alpha
        )
        for name, values in metrics.items():
            self._record(name, values)
        if not torch.isfinite(self.accelerator.gather(loss.detach()[None])).all():
            raise FloatingPointError(
                f"non-finite loss at step {self.state.global_step + 1}; stopping before it reaches the "
                "weights (lower the learning rate, check the data, or train in float32)"
            )
        return (loss, metrics) if return_outputs else loss

    # -- the loop: 5. step (Trainer), 6. EMA, 7. reference sync -----------------------------------

    def after_optimizer_step(self, step: int) -> None:
        """6. EMA update, then 7. (DPO) copy the EMA into the reference when a sync is due."""
        if step % self.args.ema_update_interval == 0:
            self.ema.update(self.accelerator.unwrap_model(self.model))
        interval = self.progress.ref_model_sync_steps
        if self.reference is not None and interval and step % interval == 0:
            self.reference.load_tensors(self.ema.tensors())
            self.progress.reference_version += 1

    # -- logging ---------------------------------------------------------------------------------

    def _record(self, name: str, values: torch.Tensor) -> None:
        values = values.detach().float().reshape(-1)
        self._metrics[name].append(self.accelerator.gather_for_metrics(values).mean().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged SAPO and preference metrics recorded since the last log, and the buffer's."""
        if self._metrics:
            logs.update({name: sum(values) / len(values) for name, values in self._metrics.items()})
            logs.update(buffer_metrics(self.buffer, self.state.global_step))
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
        """Train, or resume exactly from a checkpoint that verifies (a path, or ``True``/``"last"``),
        owning ``output_dir`` meanwhile: another run's work or a folder in use is refused."""
        with checkpoints.owning_output_dir(self.args, resume_from_checkpoint, self.args.overwrite_output_dir):
            return self._train_owned(resume_from_checkpoint, **kwargs)

    def _train_owned(self, resume_from_checkpoint: str | bool | None, **kwargs):
        path = checkpoints.resolve_on_main(self.args.output_dir, resume_from_checkpoint, self.accelerator)
        if path is not None:
            checkpoints.check_same_run(
                path, checkpoints.read_json(os.path.join(path, checkpoints.RUN_FILE)), self._run_identity()
            )
            checkpoints.load(self, path, self.args.process_index)
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
        with saving_policy_adapter_only(self.accelerator.unwrap_model(self.model)):
            super()._save(output_dir, state_dict)

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
            checkpoints.save(self, staged, self.args.process_index, is_main, self.state.global_step)
            self.accelerator.wait_for_everyone()
            if is_main:  # written last, with every file's checksum: a folder without it is not complete
                checkpoints.seal(staged, self._run_identity())
        if is_main:
            checkpoints.rotate(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
