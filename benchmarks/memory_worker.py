"""The worker side of ``benchmarks/memory.py``: one configuration, in a fresh process.

``benchmarks/memory.py`` runs one of these per configuration (``harness.run_fresh``), so that
peaks do not mix, and compares them. A worker builds the model and data, trains the
configuration for a few steps and prints one JSON object with its peak resident memory at each
phase. ``benchmarks/plan_vs_measured.py`` shares its rows (``build_rows``).
"""

from __future__ import annotations

import tempfile
import time

from benchmarks import harness

# ---------------------------------------------------------------------------------------------
# data and model (identical in every worker)
# ---------------------------------------------------------------------------------------------

WORDS = (
    "alpha beta gamma delta answer question model train token policy value reward the a of to in "
    "and is it for with on this that from step data test fast slow red blue green one two three"
).split()


def _text(rng, length: int) -> str:
    """Words joined by spaces, cut or padded to exactly ``length`` characters."""
    words: list[str] = []
    while len(" ".join(words)) < length:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:length]


def build_rows(
    n_rows: int, prompt_chars: int, answer_chars: int, jitter: int, segment_length: int, seed: int = 0
):
    """SFT rows (``prompt``/``completion``) for SAPO and preference rows
    (``prompt``/``chosen``/``rejected``) for DPO over the same prompts and gold answers.

    The char tokenizer has one token per character: a prompt is ``prompt_chars`` tokens, an answer
    ``answer_chars - jitter`` to ``answer_chars`` tokens plus EOS. Answers vary a little in length,
    as in real data, so that both trainers see padded batches (a batch without padding takes
    PyTorch's causal attention fast path, which keeps less for the backward pass than a masked one;
    SAPO's batches are padded anyway, since a sampled segment may stop at EOS), while the padded
    width stays almost the same in every batch. DPO's rejected answer is the gold answer with one
    ``segment_length`` window rewritten: the shape of a SAPO pair.
    """
    import random

    rng = random.Random(seed)
    sft, preference = [], []
    for _ in range(n_rows):
        prompt = _text(rng, prompt_chars)
        answer = _text(rng, rng.randint(answer_chars - jitter, answer_chars))
        window = min(segment_length, len(answer))
        cut = rng.randint(0, len(answer) - window)
        rejected = answer[:cut] + _text(rng, window) + answer[cut + window :]
        sft.append({"prompt": prompt, "completion": answer})
        preference.append({"prompt": prompt, "chosen": answer, "rejected": rejected})
    return sft, preference


def build_model(tokenizer, settings: dict):
    from sapo.builtin.tiny import tiny_llama

    overrides = dict(settings["model"])
    if settings.get("vocab_size"):
        # a larger output layer than the tokenizer needs: the token ids stay those of the char
        # tokenizer, but every forward computes logits over the whole vocabulary, as a real model does
        overrides["vocab_size"] = settings["vocab_size"]
    return tiny_llama(tokenizer, size="small", seed=settings["seed"], **overrides)


def lora_config(settings: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=settings["lora_r"],
        lora_alpha=2 * settings["lora_r"],
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )


def common_training_args(settings: dict, output_dir: str) -> dict:
    from sapo.builtin.settings import tiny_run_args

    return tiny_run_args(
        output_dir, settings["steps"], settings["batch_size"], settings["learning_rate"], settings["seed"],
        optim="adamw_torch", lr_scheduler_type="constant", logging_steps=settings["steps"], beta=0.1,
        max_length=settings["max_length"], gradient_checkpointing=False, data_seed=settings["seed"],
        dataloader_num_workers=0,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# one configuration, in a fresh process
# ---------------------------------------------------------------------------------------------


def run_worker(config: str, settings: dict) -> dict:
    import torch

    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from sapo import SAPOConfig, SAPOTrainer
    from sapo.builtin.tiny import char_tokenizer

    phases = harness.PeakLog()
    phases.mark("imports")
    tokenizer = char_tokenizer()
    model = build_model(tokenizer, settings)
    n_params = sum(p.numel() for p in model.parameters())
    sft_rows, preference_rows = build_rows(
        settings["rows"],
        settings["prompt_tokens"],
        settings["answer_tokens"] - 1,
        settings["length_jitter"],
        settings["segment_length"],
    )
    sft_dataset = Dataset.from_list(sft_rows)
    preference_dataset = Dataset.from_list(preference_rows)
    phases.mark("model_and_data")
    result = {"config": config, "parameters": n_params}
    if config == "baseline":
        peak = phases.mark("end")["peak_mib"]
        result.update(peak_mib=peak, phases=phases.marks, trainable_parameters=0, wall_s=0.0)
        return result

    class MarkedSAPOTrainer(SAPOTrainer):
        def generate_pairs(self, rows, step):  # instrumentation only: peaks around generation
            phases.mark(f"step_{step + 1}_before_generation")
            super().generate_pairs(rows, step)
            phases.mark(f"step_{step + 1}_after_generation")

    class StepMarks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            phases.mark("train_begin")

        def on_step_end(self, args, state, control, **kwargs):
            phases.mark(f"step_{state.global_step}_end")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        common = common_training_args(settings, output_dir)
        lora = config.startswith("lora")
        scoring = None
        if config.endswith("dpo"):
            args = DPOConfig(**common)
            ref_model = None if lora else build_model(tokenizer, settings)  # same seed: same weights
            trainer = DPOTrainer(
                model=model,
                ref_model=ref_model,
                args=args,
                train_dataset=preference_dataset,
                processing_class=tokenizer,
                peft_config=lora_config(settings) if lora else None,
            )
        else:
            args = SAPOConfig(
                **common,
                loss_type="dpo",
                segment_length=settings["segment_length"],
                ema_decay=0.5,
                ema_update_interval=1,
                sample_every_n_steps=1,
                ref_model_sync_steps=settings["ref_model_sync_steps"],
                max_prompt_length=settings["max_length"] // 2,
                pair_scoring="padded" if config.endswith("_padded") else "auto",
            )
            trainer = MarkedSAPOTrainer(
                model=model,
                args=args,
                train_dataset=sft_dataset,
                processing_class=tokenizer,
                peft_config=lora_config(settings) if lora else None,
            )
            scoring = "packed" if trainer.scorer.packed else "padded"
        phases.mark("trainer_built")
        trainer.add_callback(StepMarks())
        trainer.train()
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result.update(
        peak_mib=phases.mark("end")["peak_mib"],
        phases=phases.marks,
        trainable_parameters=trainable,
        wall_s=round(time.perf_counter() - started, 1),
        sapo_scoring=scoring,
    )
    return result


if __name__ == "__main__":
    harness.serve_worker(run_worker)
