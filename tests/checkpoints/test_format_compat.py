"""A checkpoint written by sapo 0.1 before the package was reorganised still resumes, exactly.

``fixtures/sapo-0.1-checkpoint-2`` is step 2 of a 4-step SAPO-DPO run written by the code of the
flat ``src/sapo`` layout (a 5k-parameter Llama, so the folder stays small). Resuming it with
today's code must end on the weights of a 4-step run that was never stopped. Not to the bit: the
LM head now runs in chunks and skips the prefix both DPO sides share, which changes the order of
float sums (2e-8 on these weights after 4 steps); a checkpoint written by today's code resumes
bit-identically (``test_checkpoints.py``).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from datasets import Dataset

from sapo import SAPOConfig, SAPOTrainer
from sapo.builtin.tiny import char_tokenizer, tiny_llama

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "sapo-0.1-checkpoint-2"


def trainer_for(output_dir: Path) -> SAPOTrainer:
    """The run that wrote the fixture (same rows, model, settings)."""
    tokenizer = char_tokenizer()
    rng = random.Random(0)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(32)]
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in pairs]
    model = tiny_llama(
        tokenizer, seed=0, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    args = SAPOConfig(
        output_dir=str(output_dir), loss_type="dpo", max_steps=4, per_device_train_batch_size=4,
        sample_every_n_steps=2, segment_length=3, ref_model_sync_steps=3, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, logging_steps=1, report_to="none", use_cpu=True,
        max_length=32, max_prompt_length=24, disable_tqdm=True, seed=0,
        # the fixture's pairs were sampled with generate's exact tokens, which sapo's own loop no
        # longer draws (it samples the same distribution within the top k): both runs use generate
        generation_backend="transformers",
    )  # fmt: skip
    return SAPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


def test_a_checkpoint_of_the_flat_layout_resumes(tmp_path):
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(FIXTURE, resumed_dir / "checkpoint-2")
    resumed = trainer_for(resumed_dir)
    resumed.train(resume_from_checkpoint="last")
    assert resumed.state.global_step == 4

    uninterrupted = trainer_for(tmp_path / "uninterrupted")
    uninterrupted.train()
    for (name, a), b in zip(resumed.model.named_parameters(), uninterrupted.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert resumed.ema.num_updates == uninterrupted.ema.num_updates == 4
